r"""Classifies your images with a pretrained SparseFormer: top-k class names and probabilities.

  python scripts/predict.py --model sparseformer_v1_tiny --images cat.jpg photos/
  python scripts/predict.py --model sparseformer_v1_tiny --weights sf_t.pth --images cat.jpg --json
  python scripts/predict.py --weights workdirs/my_run --images photos/ --top 3   # a main.py run

Without --weights the official release file of --model is downloaded once into the cache
($SPARSEFORMER_JAX_CACHE, default ~/.cache/sparseformer_jax). --weights takes what
sparseformer_jax.load_pretrained takes: a .pth, an http(s):// or file:// URL, a directory of
scripts/convert_checkpoint.py, or a training workdir (its dataset's label names, --ema for its
EMA params). Images are preprocessed by the input pipeline's eval transform (short side to
size / 0.875, bicubic, centre crop, the variant's normalization). A file that cannot be read gets
one line on stderr; the others are still classified, and the exit status is 1 at the end.
"""
import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from sparseformer_jax import predict
from sparseformer_jax.models.config import parse_overrides
from sparseformer_jax.trainer import checkpointing
from sparseformer_jax.weights.pretrained import DownloadError

_MODEL = flags.DEFINE_string('model', None, 'Variant name, e.g. sparseformer_v1_tiny (optional '
                             'with a workdir or converted --weights).')
_WEIGHTS = flags.DEFINE_string('weights', None, 'Where the weights are (default: the official '
                               'release file of --model).')
_IMAGES = flags.DEFINE_multi_string('images', [], 'Image files or folders (repeatable).')
_TOP = flags.DEFINE_integer('top', 5, 'How many classes to print per image.')
_JSON = flags.DEFINE_bool('json', False, 'One JSON object per line: {"image", "top": [{"index", '
                          '"label", "prob"}]}.')
_RESOLUTION = flags.DEFINE_integer('resolution', 0, 'Crop side in pixels; 0: 224, or the run\'s '
                                   'image_size.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Images per forward pass.')
_EMA = flags.DEFINE_bool('ema', False, 'With a workdir: its EMA params.')
_OVERRIDE = flags.DEFINE_multi_string('override', [], 'Model field=value (e.g. dtype=bfloat16).')


def main(argv):
  images = _IMAGES.value + argv[1:]
  if not images:
    raise app.UsageError('Pass --images FILE_OR_FOLDER ...')
  if not (_MODEL.value or _WEIGHTS.value):
    raise app.UsageError('Pass --model NAME (and optionally --weights SOURCE).')
  checkpointing.quiet_orbax_logging()
  try:
    classifier = predict.load_classifier(_MODEL.value, _WEIGHTS.value,
                                         image_size=_RESOLUTION.value or None, ema=_EMA.value,
                                         **parse_overrides(_OVERRIDE.value))
  except (ValueError, DownloadError, FileNotFoundError) as e:
    sys.exit(f'predict.py: {e}')
  failed = 0
  for result in predict.classify_files(classifier, images, top=_TOP.value,
                                       batch_size=_BATCH.value):
    if 'error' in result:
      failed += 1
      print(f'predict.py: {result["error"]}', file=sys.stderr)
    elif _JSON.value:
      print(json.dumps(result), flush=True)
    else:
      print(f'{result["image"]}: ' + ', '.join(f'{t["label"]} {t["prob"]:.3f}'
                                               for t in result['top']), flush=True)
  if failed:
    sys.exit(f'predict.py: {failed} file(s) could not be read (see above).')


if __name__ == '__main__':
  app.run(main)
