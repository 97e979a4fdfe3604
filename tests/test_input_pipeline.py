"""The TFDS -> tf.data pipeline on a tiny locally generated JPEG dataset."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import pipeline_config
from sparseformer_jax.data import input_pipeline as ip
from sparseformer_jax.models.config import IMAGENET_MEAN, IMAGENET_STD

NUM_TRAIN, NUM_EVAL, NUM_CLASSES = 12, 10, 3


def _pixel_value(index):
  return 10 + 20 * index


class DataPipelineTestImages(tfds.core.GeneratorBasedBuilder):
  """40x48 JPEGs; the red channel is constant and encodes the example index."""

  VERSION = tfds.core.Version('1.0.0')
  GENERATED_LOCALLY = True

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(NUM_TRAIN),
            'validation': self._generate_examples(NUM_EVAL)}

  def _generate_examples(self, num_examples):
    gradient = np.broadcast_to(np.linspace(0, 250, 48), (40, 48))
    for index in range(num_examples):
      image = np.stack([np.full((40, 48), _pixel_value(index)), gradient,
                        np.full((40, 48), 128)], -1).astype(np.uint8)
      yield index, {'image': image, 'label': index % NUM_CLASSES}


def _config(data_dir, **input_fields):
  return pipeline_config('data_pipeline_test_images', data_dir, 3,
                         **{'shuffle_buffer': 32, **input_fields})


def _plain_config(data_dir, **input_fields):
  """No augmentation or mixing: batches show which examples were read."""
  return _config(data_dir, **{'augment': 'none', 'mixup': 0.0, 'cutmix': 0.0,
                              'label_smoothing': 0.0, **input_fields})


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  ip.get_dataset_info(_config(path))
  return path


def _example_ids(images):
  """Recovers example indices from the (normalised) red channel."""
  red = images[..., 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
  return np.round((red.mean(axis=(1, 2)) * 255 - 10) / 20).astype(int)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_get_dataset_info_generates_a_locally_generated_dataset(tmp_path):
  config = _config(tmp_path)
  assert not ip.get_builder(config.dataset, config.data_dir).is_prepared()
  assert ip.get_dataset_info(config) == {
      'num_classes': NUM_CLASSES, 'num_train_examples': NUM_TRAIN,
      'num_eval_examples': NUM_EVAL}
  assert ip.get_builder(config.dataset, config.data_dir).is_prepared()


def test_missing_imagenet_explains_the_manual_download(tmp_path):
  config = _config(tmp_path)
  config.dataset = 'imagenet2012'
  with pytest.raises(ip.DatasetNotFoundError) as error:
    ip.create_train_iterator(config, local_batch_size=2, process_index=0, process_count=1)
  message = str(error.value)
  for needle in ('imagenet2012', str(tmp_path), 'ILSVRC2012_img_train.tar',
                 'scripts/prepare_data.py --dataset imagenet2012', '--manual_dir', 'gs://'):
    assert needle in message
  assert isinstance(error.value, FileNotFoundError)
  assert os.listdir(tmp_path) == []  # nothing downloaded or created


def test_unprepared_and_unknown_datasets_are_not_downloaded(tmp_path):
  config = _config(tmp_path)
  config.dataset = 'mnist'
  with pytest.raises(ip.DatasetNotFoundError, match='mnist.*not prepared') as error:
    ip.get_dataset_info(config)
  assert '--manual_dir' not in str(error.value)
  config.dataset = 'no_such_dataset_anywhere'
  with pytest.raises(ip.DatasetNotFoundError, match='no_such_dataset_anywhere'):
    ip.get_dataset_info(config)
  assert os.listdir(tmp_path) == []


def test_full_recipe_train_batches_are_normalised_images_and_soft_targets(data_dir):
  batches = ip.create_train_iterator(_config(data_dir, augment='inception'),
                                     local_batch_size=4, process_index=0, process_count=1)
  for batch in _take(batches, 2):
    assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (4, NUM_CLASSES) and batch['label'].dtype == np.float32
    np.testing.assert_allclose(batch['label'].sum(1), 1.0, rtol=1e-5)
    assert batch['label'].max() < 1.0                 # smoothed, and mixed
    assert np.all(np.abs(batch['image']) < 6.0)       # normalised pixels or N(0, 1) noise


def test_train_stream_resumes_exactly(data_dir):
  config = _config(data_dir, augment='light', repeated_aug=2)
  # Batch 5 over 12 examples: step 3 starts mid-epoch; the stream spans 2.5 epochs.
  stream = _take(ip.create_train_iterator(
      config, local_batch_size=5, process_index=1, process_count=2), 6)
  resumed = _take(ip.create_train_iterator(
      config, local_batch_size=5, process_index=1, process_count=2, start_step=3), 3)
  for expected, batch in zip(stream[3:], resumed):
    np.testing.assert_array_equal(batch['image'], expected['image'])
    np.testing.assert_array_equal(batch['label'], expected['label'])
  assert not np.array_equal(stream[0]['label'], stream[1]['label'])


def test_train_shares_cover_the_split_once_and_stay_per_process(data_dir):
  config = _plain_config(data_dir)
  ids = []
  for process in range(3):  # 12 examples / 3 processes = 4 per epoch = 2 batches
    batches = _take(ip.create_train_iterator(
        config, local_batch_size=2, process_index=process, process_count=3), 4)
    images = np.concatenate([b['image'] for b in batches])
    labels = np.concatenate([b['label'] for b in batches])
    process_ids = _example_ids(images)
    np.testing.assert_array_equal(labels, np.eye(NUM_CLASSES)[process_ids % NUM_CLASSES])
    ids.append(process_ids.reshape(2, 4))  # (epoch, position)
  ids = np.stack(ids)  # (process, epoch, position)
  assert sorted(ids[:, 0].ravel()) == list(range(NUM_TRAIN))
  for epoch_1, epoch_2 in ids:  # each process re-reads only its own share
    assert sorted(epoch_1) == sorted(epoch_2)
  assert not np.array_equal(ids[:, 0], ids[:, 1])  # reshuffled every epoch


def test_repeated_augmentation_repeats_each_image_with_new_augmentations(data_dir):
  config = _plain_config(data_dir, augment='light', repeated_aug=3)
  batches = _take(ip.create_train_iterator(
      config, local_batch_size=6, process_index=0, process_count=1), 2)
  images = np.concatenate([b['image'] for b in batches])  # one epoch of 12
  ids = _example_ids(images)
  assert len(set(ids)) == 4 and all(np.all(ids[i:i + 3] == ids[i]) for i in range(0, 12, 3))
  assert not np.array_equal(images[0], images[1])  # copies differ


def test_cache_yields_the_same_stream(data_dir):
  streams = [_take(ip.create_train_iterator(
      _plain_config(data_dir, cache=cache), local_batch_size=4, process_index=1,
      process_count=2), 3) for cache in (False, True)]
  for uncached, cached in zip(*streams):
    np.testing.assert_array_equal(uncached['image'], cached['image'])


def test_eval_covers_every_example_once_with_equal_batch_counts(data_dir):
  config = _plain_config(data_dir)
  ids, counts = [], []
  for process in range(3):
    batches = list(ip.create_eval_iterator(
        config, local_batch_size=3, process_index=process, process_count=3))
    counts.append(len(batches))
    for batch in batches:
      assert batch['image'].shape == (3, 32, 32, 3) and batch['image'].dtype == np.float32
      assert batch['label'].dtype == np.int32 and batch['mask'].dtype == bool
      real = batch['mask']
      batch_ids = _example_ids(batch['image'][real])
      np.testing.assert_array_equal(batch['label'][real], batch_ids % NUM_CLASSES)
      assert np.all(batch['image'][~real] == 0)
      ids.extend(batch_ids)
  assert counts == [2, 2, 2]  # ceil(ceil(10 / 3) / 3)
  assert sorted(ids) == list(range(NUM_EVAL))


def test_eval_passes_are_identical(data_dir):
  config = _config(data_dir)  # default augment: eval is unaffected by train settings
  first, second = (list(ip.create_eval_iterator(config, local_batch_size=4, process_index=0,
                                                process_count=1)) for _ in range(2))
  assert len(first) == 3 and [b['mask'].sum() for b in first] == [4, 4, 2]
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_process_split_rejects_a_bad_index():
  with pytest.raises(ValueError, match='process_index 2'):
    ip.process_split('train', 2, 2)


def test_wrong_feature_keys_are_named(data_dir):
  config = _config(data_dir)
  config.label_key = 'image'
  with pytest.raises(ValueError, match="no ClassLabel feature 'image'.*config.label_key"):
    ip.get_dataset_info(config)
