"""ImageNet without ImageNet: fake official tars -> prepare_data.py -> pipeline.

The real TFDS imagenet2012 builder reads ILSVRC2012_img_train.tar (one inner
tar per synset) and ILSVRC2012_img_val.tar from the manual dir; validation
labels come from TFDS's own validation_labels.txt, matched to the val images
in sorted file-name order. ILSVRC2012_img_test.tar is optional (its split is
skipped when absent).
"""

import contextlib
import io
import os
import pathlib
import runpy
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from conftest import pipeline_config
from sparseformer_jax.data import input_pipeline as ip
from sparseformer_jax.models.config import IMAGENET_MEAN, IMAGENET_STD

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'prepare_data.py'
IMAGENET_DIR = pathlib.Path(tfds.__file__).parent / 'datasets' / 'imagenet2012'
SYNSETS_PER_SPLIT, IMAGES_PER_SYNSET, NUM_VAL = 3, 3, 10


def _jpeg(value: int) -> bytes:
  """A 36x44 JPEG whose red channel is the constant `value` (an example id)."""
  image = np.zeros((36, 44, 3), np.uint8)
  image[..., 0] = value
  image[..., 1] = np.linspace(0, 200, 44, dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def _add_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def _pixel_value(example_id: int) -> int:
  return 10 + 20 * example_id


def _write_fake_imagenet(manual_dir: pathlib.Path, synsets: list[str]) -> None:
  """Train images of synset s have id s; val image k (1-based) has id k - 1."""
  with tarfile.open(manual_dir / 'ILSVRC2012_img_train.tar', 'w') as train:
    for synset_id, synset in enumerate(synsets):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as images:
        for k in range(IMAGES_PER_SYNSET):
          _add_file(images, f'{synset}_{10026 + k}.JPEG', _jpeg(_pixel_value(synset_id)))
      _add_file(train, f'{synset}.tar', inner.getvalue())
  with tarfile.open(manual_dir / 'ILSVRC2012_img_val.tar', 'w') as val:
    for k in range(1, NUM_VAL + 1):
      _add_file(val, f'ILSVRC2012_val_{k:08d}.JPEG', _jpeg(_pixel_value(k - 1)))


def _example_ids(images):
  red = images[..., 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
  return np.round((red.mean(axis=(1, 2)) * 255 - 10) / 20).astype(int)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """Prepares the fake ImageNet by running scripts/prepare_data.py as __main__."""
  root = tmp_path_factory.mktemp('imagenet')
  manual_dir, data_dir = root / 'manual', root / 'tfds'
  manual_dir.mkdir()
  class_names = (IMAGENET_DIR / 'labels.txt').read_text().split()
  _write_fake_imagenet(manual_dir, class_names[:SYNSETS_PER_SPLIT])
  argv, out, err = sys.argv, io.StringIO(), io.StringIO()
  sys.argv = [str(SCRIPT), '--dataset', 'imagenet2012', '--data_dir', str(data_dir),
              '--manual_dir', str(manual_dir)]
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      runpy.run_path(str(SCRIPT), run_name='__main__')
  finally:
    sys.argv = argv
  val_synsets = (IMAGENET_DIR / 'validation_labels.txt').read_text().split()[:NUM_VAL]
  return {'data_dir': data_dir, 'stdout': out.getvalue(), 'stderr': err.getvalue(),
          'val_labels': [class_names.index(s) for s in val_synsets]}


def _config(data_dir):
  return pipeline_config('imagenet2012', data_dir, 0, augment='light', mixup=0.0, cutmix=0.0,
                         label_smoothing=0.0, shuffle_buffer=16)


def test_prepare_data_builds_the_real_imagenet2012_splits(prepared):
  assert 'train: 9 examples' in prepared['stdout']
  assert 'validation: 10 examples' in prepared['stdout']
  assert 'Generating train examples' in prepared['stderr']  # TFDS progress bars
  assert ip.get_dataset_info(_config(prepared['data_dir'])) == {
      'num_classes': 1000, 'num_train_examples': SYNSETS_PER_SPLIT * IMAGES_PER_SYNSET,
      'num_eval_examples': NUM_VAL}


def test_train_batches_carry_synset_label_ids(prepared):
  batches = ip.create_train_iterator(_config(prepared['data_dir']), local_batch_size=3,
                                     process_index=0, process_count=1)
  epoch = [next(batches) for _ in range(3)]
  images = np.concatenate([b['image'] for b in epoch])
  labels = np.concatenate([b['label'] for b in epoch])
  assert images.shape == (9, 32, 32, 3) and images.dtype == np.float32
  assert labels.shape == (9, 1000) and labels.dtype == np.float32
  label_ids = labels.argmax(1)
  np.testing.assert_array_equal(labels.max(1), 1.0)
  np.testing.assert_array_equal(label_ids, _example_ids(images))  # synset i -> class i
  assert sorted(label_ids) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_eval_batches_carry_the_official_validation_labels(prepared):
  config = _config(prepared['data_dir'])
  pairs = []
  for process in range(2):
    batches = list(ip.create_eval_iterator(config, local_batch_size=4,
                                           process_index=process, process_count=2))
    assert len(batches) == 2  # ceil(ceil(10 / 2) / 4)
    for batch in batches:
      assert batch['image'].shape == (4, 32, 32, 3) and batch['label'].dtype == np.int32
      real = batch['mask']
      pairs.extend(zip(_example_ids(batch['image'][real]), batch['label'][real]))
  assert sorted(pairs) == list(enumerate(prepared['val_labels']))  # each image once
