r"""Draws every token's RoI after each focusing repeat and after the cortex's sampling unit.

  # a training run (its config.json and latest checkpoint), on its own validation images:
  python scripts/visualize.py --checkpoint workdirs/default --dataset_images 8 --out rois.png
  # official PyTorch weights on your own pictures:
  python scripts/visualize.py --torch sparseformer_v1_tiny.pth --model sparseformer_v1_tiny \
      --images cat.jpg dog.jpg --resolution 224 --points --out rois.png
"""
import json
import os
import sys

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from sparseformer_jax import NORMALIZATION, create_model, load_torch_model, token_intermediates
from sparseformer_jax.trainer import checkpointing
from sparseformer_jax.models.config import parse_overrides
from sparseformer_jax.analysis.visualize import denormalize, render_rois

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A training workdir (or checkpoint dir).')
_TORCH = flags.DEFINE_string('torch', None, 'An official PyTorch .pth file (needs --model).')
_MODEL = flags.DEFINE_string('model', None, 'Variant name for --torch, e.g. sparseformer_v1_tiny.')
_IMAGES = flags.DEFINE_multi_string('images', [], 'Image files to draw on.')
_DATASET_IMAGES = flags.DEFINE_integer('dataset_images', 0,
                                       'With --checkpoint: draw on this many validation images '
                                       'of the run\'s dataset instead of --images.')
_RESOLUTION = flags.DEFINE_integer('resolution', 0, 'Input side in pixels; 0: the run\'s '
                                   'image_size, or 224 for --torch.')
_POINTS = flags.DEFINE_bool('points', False, 'Also draw each token\'s sampling points.')
_CELL = flags.DEFINE_integer('cell_size', 192, 'Height of one picture in the grid, in pixels.')
_OUT = flags.DEFINE_string('out', 'rois.png', 'Where to write the PNG.')
_OVERRIDE = flags.DEFINE_multi_string('override', [], 'With --torch: model field=value.')


def load_run(workdir: str):
  """(model, variables, config) of a training run from its config.json and latest checkpoint."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  params = checkpointing.load_saved_params(
      workdir, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  overrides = {k: v for k, v in config.model.overrides.to_dict().items() if v is not None}
  model = create_model(config.model.name, num_classes=params['head']['kernel'].shape[-1],
                       **overrides)
  return model, {'params': params}, config


def read_images(paths, size: int, mean, std) -> np.ndarray:
  """Image files -> normalized float32 (B, size, size, 3)."""
  images = [np.asarray(Image.open(p).convert('RGB').resize((size, size), Image.BICUBIC),
                       np.float32) / 255.0 for p in paths]
  return (np.stack(images) - np.asarray(mean)) / np.asarray(std)


def dataset_images(config, count: int) -> np.ndarray:
  """The first `count` validation images of the run's dataset, as the run's eval sees them."""
  from sparseformer_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  batch = next(iter(input_pipeline.create_eval_iterator(
      config, local_batch_size=count, process_index=0, process_count=1)))
  return np.asarray(batch['image'])[np.asarray(batch['mask'])]


def main(argv):
  del argv
  if bool(_CHECKPOINT.value) == bool(_TORCH.value):
    raise app.UsageError('Pass exactly one of --checkpoint DIR or --torch FILE.')
  if _CHECKPOINT.value:
    model, variables, config = load_run(_CHECKPOINT.value)
    mean, std = config.input.mean, config.input.std
    size = _RESOLUTION.value or config.input.image_size
  else:
    if not _MODEL.value:
      raise app.UsageError('--torch needs --model NAME.')
    model, variables = load_torch_model(_TORCH.value, _MODEL.value,
                                        **parse_overrides(_OVERRIDE.value))
    mean, std = NORMALIZATION[_MODEL.value]
    size = _RESOLUTION.value or 224
  if model.config.video:
    raise app.UsageError('visualize.py draws image models; this one is a video model.')
  if _DATASET_IMAGES.value:
    if not _CHECKPOINT.value:
      raise app.UsageError('--dataset_images needs --checkpoint (the run names its dataset).')
    images = dataset_images(config, _DATASET_IMAGES.value)
  elif _IMAGES.value:
    images = read_images(_IMAGES.value, size, mean, std)
  else:
    raise app.UsageError('Pass --images FILE ... or --dataset_images N.')
  intermediates = token_intermediates(model, variables, images)
  grid = render_rois(denormalize(images, mean, std), intermediates, cell_size=_CELL.value,
                     show_points=_POINTS.value)
  Image.fromarray(grid).save(_OUT.value)
  print(f'Wrote {_OUT.value}: {grid.shape[1]}x{grid.shape[0]} px, {len(images)} images.')


if __name__ == '__main__':
  app.run(main)
