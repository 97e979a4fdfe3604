r"""Draws where the tokens look: every token's RoI after each focusing repeat and after the
cortex's sampling unit, and with --density a heat map of where the sampling points land.

  # a training run (its config.json and latest checkpoint), on its own validation images:
  python scripts/visualize.py --checkpoint workdirs/default --dataset_images 8 --out rois.png
  # the official weights (downloaded once) on your own pictures, files or folders:
  python scripts/visualize.py --model sparseformer_v1_tiny --images cat.jpg photos/ \
      --points --density --out rois.png      # also writes rois_density.png
  # an official PyTorch .pth file:
  python scripts/visualize.py --torch sparseformer_v1_tiny.pth --model sparseformer_v1_tiny \
      --images cat.jpg --out rois.png

Images go through the input pipeline's eval transform (short side to size / 0.875, centre crop).
The density picture has one heat map per drawn image and, last, the mean over every image given
(all of a folder, not only the --max_images drawn). A file that cannot be read gets one line on
stderr; the others are drawn, and the exit status is 1 at the end.
"""
import os
import sys

from absl import app
from absl import flags
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from sparseformer_jax import NORMALIZATION, load_pretrained, token_intermediates
from sparseformer_jax.analysis import visualize
from sparseformer_jax.models.config import parse_overrides
from sparseformer_jax.predict import eval_input_config, read_images
from sparseformer_jax.trainer import checkpointing
from sparseformer_jax.weights import pretrained

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A training workdir (or checkpoint dir).')
_TORCH = flags.DEFINE_string('torch', None, 'Weights for --model: a .pth, URL or converted dir '
                             '(default: the official release file).')
_MODEL = flags.DEFINE_string('model', None, 'Variant name, e.g. sparseformer_v1_tiny.')
_IMAGES = flags.DEFINE_multi_string('images', [], 'Image files or folders to draw on.')
_DATASET_IMAGES = flags.DEFINE_integer('dataset_images', 0,
                                       'With --checkpoint: draw on this many validation images '
                                       'of the run\'s dataset instead of --images.')
_RESOLUTION = flags.DEFINE_integer('resolution', 0, 'Input side in pixels; 0: the run\'s '
                                   'image_size, or 224.')
_POINTS = flags.DEFINE_bool('points', False, 'Also draw each token\'s sampling points.')
_DENSITY = flags.DEFINE_bool('density', False, 'Also write <out>_density.png: heat maps of the '
                             'sampling points per image and their mean over all images.')
_BINS = flags.DEFINE_integer('density_bins', 56, 'Heat map cells per side.')
_MAX_IMAGES = flags.DEFINE_integer('max_images', 16, 'Draw at most this many images (the density '
                                   'mean still covers all).')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Images per forward pass.')
_CELL = flags.DEFINE_integer('cell_size', 192, 'Height of one picture in the grid, in pixels.')
_OUT = flags.DEFINE_string('out', 'rois.png', 'Where to write the PNG.')
_OVERRIDE = flags.DEFINE_multi_string('override', [], 'With --model: model field=value.')


def dataset_images(config, count: int) -> np.ndarray:
  """The first `count` validation images of the run's dataset, as the run's eval sees them."""
  from sparseformer_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  batch = next(iter(input_pipeline.create_eval_iterator(
      config, local_batch_size=count, process_index=0, process_count=1)))
  return np.asarray(batch['image'])[np.asarray(batch['mask'])]


def file_batches(paths, input_config, batch_size: int):
  """(batches (B, size, size, 3) of the readable image files, the list of error lines, filled
  as the batches are drawn, each also printed to stderr)."""
  failures = []

  def batches():
    batch = []
    for _, pixels, error in read_images(paths, input_config):
      if error:
        failures.append(error)
        print(f'visualize.py: {error}', file=sys.stderr)
        continue
      batch.append(pixels)
      if len(batch) == batch_size:
        yield np.stack(batch)
        batch = []
    if batch:
      yield np.stack(batch)

  return batches(), failures


def merge_units(batches):
  """Per-batch unit lists of {'name', 'rois' (R, B, ...), 'points'} -> one list, B concatenated."""
  return [{k: v if k == 'name' else np.concatenate([b[u][k] for b in batches], axis=1)
           for k, v in unit.items()} for u, unit in enumerate(batches[0])]


def load(argv_images):
  """(model, variables, input config, batches, failures) from the flags."""
  if _CHECKPOINT.value:
    model, variables, config = pretrained.load_run(_CHECKPOINT.value)
    input_config = config.input
    if _RESOLUTION.value:
      input_config.image_size = _RESOLUTION.value
  else:
    if not _MODEL.value:
      raise app.UsageError('Pass --checkpoint DIR, or --model NAME [--torch WEIGHTS].')
    model, variables = load_pretrained(_MODEL.value, _TORCH.value,
                                       **parse_overrides(_OVERRIDE.value))
    config = None
    input_config = eval_input_config(*NORMALIZATION[_MODEL.value], _RESOLUTION.value or None)
  if model.config.video:
    raise app.UsageError('visualize.py draws image models; this one is a video model.')
  if _DATASET_IMAGES.value:
    if config is None:
      raise app.UsageError('--dataset_images needs --checkpoint (the run names its dataset).')
    return model, variables, input_config, iter([dataset_images(config, _DATASET_IMAGES.value)]), []
  if not argv_images:
    raise app.UsageError('Pass --images FILE_OR_FOLDER ... or --dataset_images N.')
  return (model, variables, input_config) + file_batches(argv_images, input_config, _BATCH.value)


def main(argv):
  checkpointing.quiet_orbax_logging()
  try:
    model, variables, input_config, batches, failures = load(_IMAGES.value + argv[1:])
  except (ValueError, pretrained.DownloadError, FileNotFoundError) as e:
    sys.exit(f'visualize.py: {e}')
  mean, std = input_config.mean, input_config.std
  drawn, intermediates, densities, total, count = [], [], [], 0.0, 0
  for images in batches:
    out = token_intermediates(model, variables, images)
    density = visualize.point_density(visualize.sampling_points(out), _BINS.value)
    total, count = total + density.sum(axis=0), count + len(images)
    keep = max(0, min(len(images), _MAX_IMAGES.value - len(drawn)))
    if keep:
      drawn.extend(images[:keep])
      intermediates.append([{k: v if k == 'name' else v[:, :keep] for k, v in unit.items()
                            if k in ('name', 'rois', 'points')} for unit in out['units']])
      densities.extend(density[:keep])
  if not drawn:
    sys.exit('visualize.py: no image could be read.')
  pixels = visualize.denormalize(np.stack(drawn), mean, std)
  grid = visualize.render_rois(pixels, {'units': merge_units(intermediates)}, cell_size=_CELL.value,
                               show_points=_POINTS.value)
  Image.fromarray(grid).save(_OUT.value)
  print(f'Wrote {_OUT.value}: {grid.shape[1]}x{grid.shape[0]} px, {len(drawn)} images.')
  if _DENSITY.value:
    path = os.path.splitext(_OUT.value)[0] + '_density.png'
    picture = visualize.render_density(pixels, np.stack(densities), total / count, count,
                                       cell_size=_CELL.value)
    Image.fromarray(picture).save(path)
    print(f'Wrote {path}: sampling-point density of {len(drawn)} images and their mean over '
          f'{count}.')
  if failures:
    sys.exit(f'visualize.py: {len(failures)} file(s) could not be read (see above).')


if __name__ == '__main__':
  app.run(main)
