r"""Converts an official PyTorch SparseFormer checkpoint into an Orbax checkpoint of {'params'}.

  python scripts/convert_checkpoint.py --model sparseformer_v1_tiny --out converted/sf_t
  # (the official release file, downloaded once into the cache; or --torch FILE_OR_URL)
  # evaluate it:
  python main.py --config=configs/sparseformer_t.py --workdir=workdirs/sf_t_eval \
      --config.init_from=converted/sf_t --config.eval_only=True
  # or fine-tune from it (a new run; resuming that run later needs no flag):
  python main.py --config=configs/sparseformer_t.py --workdir=workdirs/sf_t_ft \
      --config.init_from=converted/sf_t

Non-default sizes take --override field=value (repeatable), e.g. --override num_classes=10.
Both official key layouts are read, without PyTorch (nothing in the file can run code). The script
prints the model fields (numerics flavor) that the training config needs to reproduce the
official outputs exactly, and records them in <out>/model.json for
sparseformer_jax.load_pretrained(source=<out>).
"""
import ast
import os
import sys

from absl import app
from absl import flags
from etils import epath

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from sparseformer_jax import get_config, load_torch_model
from sparseformer_jax.trainer import checkpointing
from sparseformer_jax.weights import pretrained

_TORCH = flags.DEFINE_string('torch', None, 'The .pth file or URL (either official layout); '
                             'default: the official release file of --model.')
_MODEL = flags.DEFINE_string('model', None, 'Variant name, e.g. sparseformer_v1_tiny.',
                             required=True)
_OUT = flags.DEFINE_string('out', None, 'New directory for the Orbax checkpoint.',
                           required=True)
_OVERRIDE = flags.DEFINE_multi_string('override', [], 'Model field=value (Python literal).')


def parse_overrides(items):
  """['num_classes=10', "flavor='library'"] -> {'num_classes': 10, 'flavor': 'library'}."""
  overrides = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep:
      raise app.UsageError(f'--override {item!r}: expected field=value.')
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value  # A bare string such as flavor=library.
  return overrides


def convert(torch_path: str, model: str, out: str, overrides: dict) -> dict:
  """Writes <out>/0/state = {'params'} and <out>/model.json; returns the model fields the
  config must set.

  `out` appears complete or not at all: the checkpoint is written beside it and renamed.
  """
  target = epath.Path(checkpointing.absolute(out))
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise ValueError(f'--out {out} is not empty; choose a new directory.')
  if not torch_path and model not in pretrained.PRETRAINED_URLS:
    raise ValueError(f'{model!r} has no official release file (released: '
                     f'{", ".join(pretrained.PRETRAINED_URLS)}); pass --torch FILE.')
  torch_path = pretrained.fetch(torch_path or pretrained.PRETRAINED_URLS[model])
  module, variables = load_torch_model(torch_path, model, **overrides)
  default = get_config(model, **overrides)
  fields = {field: getattr(module.config, field) for field in ('flavor', 'grad_clamp')
            if getattr(module.config, field) != getattr(default, field)}
  partial = target.parent / f'.{target.name}.partial-{os.getpid()}'
  try:
    checkpoints = checkpointing.Checkpoints(str(partial), keep=1)
    checkpoints.save(0, {'params': variables['params']}, wait=True)
    checkpoints.close()
    pretrained.write_model_file(str(partial), model, {**overrides, **fields})
    if target.exists():
      target.rmdir()  # empty, as checked
    partial.rename(target)
  finally:
    if partial.exists():
      partial.rmtree()
  return fields


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  checkpointing.quiet_orbax_logging()
  overrides = parse_overrides(_OVERRIDE.value)
  out = checkpointing.absolute(_OUT.value)
  try:
    fields = convert(_TORCH.value, _MODEL.value, out, overrides)
  except (ValueError, checkpointing.CheckpointError, pretrained.DownloadError) as e:
    sys.exit(f'convert_checkpoint.py: {e}')  # bad or refused .pth, mismatch, used --out
  print(f'Wrote {epath.Path(out) / "0"}; use it with --config.init_from={out}')
  for field, value in {**overrides, **fields}.items():
    if field != 'num_classes':  # That one comes from the dataset.
      print(f'  set --config.model.overrides.{field}={value!r} (the checkpoint was made so)')


if __name__ == '__main__':
  app.run(main)
