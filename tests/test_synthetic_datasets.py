"""Tests of the locally generated datasets `synthetic_objects` and `synthetic_motion`.

Both 'smoke' configs are generated once into a temporary data dir with Python
sockets disabled, then checked for shapes, balance, determinism, and that the
label needs the target: global statistics (and a single video frame) score
near chance with a nearest-class-mean classifier, while the target itself
(its crop, or its motion) gives the label away.
"""

import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sparseformer_jax.data.embedded import synthetic_motion
from sparseformer_jax.data.embedded import synthetic_objects

NUM_CLASSES = 10
NEAR_CHANCE = 0.25  # chance is 0.10; 128 validation examples


def _refuse_network(*args, **kwargs):
  raise AssertionError('dataset generation tried to open a network connection')


def prepare(name, data_dir):
  """Generates dataset `name` into `data_dir` while Python sockets are disabled."""
  builder = tfds.builder(name, data_dir=data_dir)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket.socket, 'connect', _refuse_network)
    patch.setattr(socket, 'create_connection', _refuse_network)
    builder.download_and_prepare()  # as the input pipeline calls it: default DownloadConfig
  return builder


def load(builder, split):
  return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))


@pytest.fixture(scope='module')
def objects(tmp_path_factory):
  builder = prepare('synthetic_objects/smoke', tmp_path_factory.mktemp('data') / 'not_yet_created')
  return builder, load(builder, 'train'), load(builder, 'validation')


@pytest.fixture(scope='module')
def motion(tmp_path_factory):
  builder = prepare('synthetic_motion/smoke', tmp_path_factory.mktemp('data') / 'not_yet_created')
  return builder, load(builder, 'train'), load(builder, 'validation')


def nearest_class_mean_accuracy(train_x, train_y, test_x, test_y):
  """Validation accuracy of classifying standardised features by the closest class mean."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  centroids = np.stack([train_x[train_y == c].mean(0) for c in range(NUM_CLASSES)])
  distances = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1)
  return np.mean(distances.argmin(1) == test_y)


def saturation(pixels):
  """max - min over RGB: zero on the gray background and distractors, high on targets."""
  return pixels.max(-1).astype(np.float32) - pixels.min(-1)


def assert_balanced_labels(labels):
  assert labels.min() >= 0 and labels.max() < NUM_CLASSES
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize('name', ['synthetic_objects', 'synthetic_motion'])
def test_builder_registered_with_configs_and_local_flag(name):
  builder_cls = tfds.builder_cls(name)
  assert builder_cls.GENERATED_LOCALLY
  assert [config.name for config in builder_cls.BUILDER_CONFIGS] == ['default', 'smoke']


def test_objects_features_and_splits(objects):
  builder, train, validation = objects
  assert builder.info.splits['train'].num_examples == 512
  assert builder.info.splits['validation'].num_examples == 128
  assert builder.info.features['label'].names[:3] == ['square', 'circle', 'triangle']
  assert train['image'].shape == (512, 64, 64, 3) and train['image'].dtype == np.uint8
  assert validation['image'].shape == (128, 64, 64, 3)
  assert_balanced_labels(train['label'])
  bbox = train['bbox']
  assert np.all((bbox >= 0) & (bbox <= 1))
  assert np.all(bbox[:, 2] > bbox[:, 0]) and np.all(bbox[:, 3] > bbox[:, 1])


def test_motion_features_and_splits(motion):
  builder, train, validation = motion
  assert builder.info.splits['train'].num_examples == 512
  assert builder.info.splits['validation'].num_examples == 128
  assert builder.info.features['label'].names[:3] == ['000deg', '036deg', '072deg']
  assert train['video'].shape == (512, 8, 32, 32, 3) and train['video'].dtype == np.uint8
  assert validation['video'].shape == (128, 8, 32, 32, 3)
  assert_balanced_labels(train['label'])


@pytest.mark.parametrize('dataset,key', [('objects', 'image'), ('motion', 'video')])
def test_generation_is_deterministic(dataset, key, request, tmp_path):
  builder, _, first = request.getfixturevalue(dataset)
  second = load(prepare(f'{builder.name}/{builder.builder_config.name}', tmp_path), 'validation')
  np.testing.assert_array_equal(first[key], second[key])
  np.testing.assert_array_equal(first['label'], second['label'])


def test_mean_color_does_not_reveal_shape(objects):
  _, train, validation = objects
  accuracy = nearest_class_mean_accuracy(
      train['image'].mean((1, 2)), train['label'], validation['image'].mean((1, 2)), validation['label'])
  assert accuracy < NEAR_CHANCE


def _target_masks(images, bboxes, resolution=12):
  """The saturated (target) pixels inside each target box, resampled to a fixed grid."""
  size = images.shape[1]
  grid = (np.arange(resolution) + 0.5) / resolution
  masks = []
  for image, (ymin, xmin, ymax, xmax) in zip(images, bboxes):
    rows = ((ymin + (ymax - ymin) * grid) * size).astype(int)
    cols = ((xmin + (xmax - xmin) * grid) * size).astype(int)
    masks.append(saturation(image)[np.ix_(rows, cols)] > 100)
  return np.reshape(masks, (len(images), -1)).astype(np.float32)


def test_target_crop_reveals_shape(objects):
  """Positive control for the test above: the same classifier reads the label
  from the target once it is told where the target is (its bbox)."""
  _, train, validation = objects
  accuracy = nearest_class_mean_accuracy(
      _target_masks(train['image'], train['bbox']), train['label'],
      _target_masks(validation['image'], validation['bbox']), validation['label'])
  assert accuracy > 0.8


def _pooled_saturation(frames, cells=8):
  """Target presence per cell of a cells x cells grid: where the target is."""
  sat = saturation(frames)
  n, size = sat.shape[0], sat.shape[1]
  return sat.reshape(n, cells, size // cells, cells, size // cells).mean((2, 4)).reshape(n, -1)


def test_single_frame_does_not_reveal_direction(motion):
  _, train, validation = motion
  for frame in (0, -1):
    accuracy = nearest_class_mean_accuracy(
        _pooled_saturation(train['video'][:, frame]), train['label'],
        _pooled_saturation(validation['video'][:, frame]), validation['label'])
    assert accuracy < NEAR_CHANCE, frame


def test_clip_mean_color_does_not_reveal_direction(motion):
  _, train, validation = motion
  accuracy = nearest_class_mean_accuracy(
      train['video'].mean((1, 2, 3)), train['label'], validation['video'].mean((1, 2, 3)), validation['label'])
  assert accuracy < NEAR_CHANCE


def _target_track(videos):
  """(N, T, 2) target centre (y, x) per frame: the circular mean of saturation,
  since objects wrap around the frame borders."""
  sat = saturation(videos)
  size = sat.shape[-1]
  phase = np.exp(2j * np.pi * np.arange(size) / size)
  y = np.angle((sat.sum(3) * phase).sum(-1))
  x = np.angle((sat.sum(2) * phase).sum(-1))
  return np.stack([y, x], -1) * size / (2 * np.pi)


def test_target_motion_reveals_direction(motion):
  """Summing the target's frame-to-frame steps (each wrapped to the shortest
  way round) gives its displacement, whose angle is the labelled direction."""
  _, _, validation = motion
  size = validation['video'].shape[2]
  steps = np.diff(_target_track(validation['video']), axis=1)
  dy, dx = ((steps + size / 2) % size - size / 2).sum(1).T
  angle = np.degrees(np.arctan2(-dy, dx)) % 360  # y points down on screen
  predicted = np.round(angle / (360 / NUM_CLASSES)).astype(int) % NUM_CLASSES
  assert np.mean(predicted == validation['label']) > 0.95


def test_render_image_puts_target_inside_bbox():
  config = synthetic_objects.SyntheticObjects.BUILDER_CONFIGS[0]
  image, bbox = synthetic_objects.render_image(config, np.random.default_rng(0), 'square')
  rows, cols = np.nonzero(saturation(image) > 100)
  size = config.canvas_size
  assert rows.min() >= np.floor(bbox.ymin * size) and rows.max() < np.ceil(bbox.ymax * size)
  assert cols.min() >= np.floor(bbox.xmin * size) and cols.max() < np.ceil(bbox.xmax * size)


def test_direction_names_follow_class_angles():
  assert synthetic_motion.direction_names(8) == [
      '000deg', '045deg', '090deg', '135deg', '180deg', '225deg', '270deg', '315deg']
