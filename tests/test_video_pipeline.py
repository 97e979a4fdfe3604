"""The video input path (input.num_frames > 0) on a tiny locally generated TFDS video dataset."""

import importlib
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from conftest import pipeline_config
from sparseformer_jax.data import input_pipeline as ip
from sparseformer_jax.models.config import IMAGENET_MEAN, IMAGENET_STD

NUM_TRAIN, NUM_EVAL, NUM_CLASSES = 8, 7, 3
HEIGHT, WIDTH = 12, 16
LENGTHS = (2, 7, 10, 13)       # frames of example i: LENGTHS[i % 4]
NUM_FRAMES, STRIDE = 3, 2      # a clip spans 5 frames
SIZE = 8
MEAN, STD = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)


def _length(index):
  return LENGTHS[index % len(LENGTHS)]


def _red(frame):
  return 10 + 15 * frame


def _green(index):
  return 10 + 20 * index


class VideoPipelineTestClips(tfds.core.GeneratorBasedBuilder):
  """Flat-coloured frames: red encodes the frame index, green the example index.

  'video' stores them as a Video (PNG frames), 'video_tensor' as a uint8 Tensor;
  'still' is a random texture repeated in every frame.
  """

  VERSION = tfds.core.Version('1.0.0')
  GENERATED_LOCALLY = True

  def _info(self):
    shape = (None, HEIGHT, WIDTH, 3)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'video': tfds.features.Video(shape=shape),
        'video_tensor': tfds.features.Tensor(shape=shape, dtype=np.uint8,
                                             encoding=tfds.features.Encoding.ZLIB),
        'still': tfds.features.Tensor(shape=shape, dtype=np.uint8),
        'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(0, NUM_TRAIN),
            'validation': self._generate_examples(100, NUM_EVAL)}

  def _generate_examples(self, seed, num_examples):
    for index in range(num_examples):
      length = _length(index)
      video = np.empty((length, HEIGHT, WIDTH, 3), np.uint8)
      video[..., 0] = _red(np.arange(length))[:, None, None]
      video[..., 1] = _green(index)
      video[..., 2] = 128
      texture = np.random.default_rng(seed + index).integers(0, 256, (HEIGHT, WIDTH, 3))
      still = np.broadcast_to(texture.astype(np.uint8), video.shape)
      yield index, {'video': video, 'video_tensor': video, 'still': still,
                    'label': index % NUM_CLASSES}


def _config(data_dir, image_key='video', **input_fields):
  return pipeline_config('video_pipeline_test_clips', data_dir, 5, image_key,
                         **{'image_size': SIZE, 'num_frames': NUM_FRAMES,
                            'temporal_stride': STRIDE, 'shuffle_buffer': 16, **input_fields})


def _plain_config(data_dir, **input_fields):
  """No spatial augmentation or mixing: every frame stays one flat colour."""
  return _config(data_dir, **{'augment': 'none', 'mixup': 0.0, 'cutmix': 0.0,
                              'label_smoothing': 0.0, **input_fields})


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  ip.get_dataset_info(_config(path))
  return path


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _train(config, n, *, batch=4, process=0, processes=1, start_step=0):
  return _take(ip.create_train_iterator(config, local_batch_size=batch, process_index=process,
                                        process_count=processes, start_step=start_step), n)


def _eval(config, *, batch=4, process=0, processes=1):
  return list(ip.create_eval_iterator(config, local_batch_size=batch, process_index=process,
                                      process_count=processes))


def _decode_ids(clips):
  """Normalised flat frames (..., T, H, W, 3) -> (example ids (...), frame indices (..., T))."""
  colours = np.round((clips * STD + MEAN) * 255).mean(axis=(-3, -2))  # (..., T, 3)
  frames = (colours[..., 0] - 10) / 15
  examples = (colours[..., 1] - 10) / 20
  assert np.all(examples == examples[..., :1])  # one example per clip
  return examples[..., 0].astype(int), frames.astype(int)


def test_dataset_info_counts_videos(data_dir):
  assert ip.get_dataset_info(_config(data_dir)) == {
      'num_classes': NUM_CLASSES, 'num_train_examples': NUM_TRAIN,
      'num_eval_examples': NUM_EVAL}


def test_batches_are_normalised_clips_with_the_image_contract(data_dir):
  train = _train(_config(data_dir, augment='light'), 2)  # Mixup/CutMix, smoothing: soft targets
  for batch in train:
    assert batch['image'].shape == (4, NUM_FRAMES, SIZE, SIZE, 3)
    assert batch['image'].dtype == np.float32
    assert batch['label'].shape == (4, NUM_CLASSES) and batch['label'].dtype == np.float32
    np.testing.assert_allclose(batch['label'].sum(1), 1.0, rtol=1e-5)
    assert np.all(np.abs(batch['image']) < 3.0)  # normalised pixels
  batch = _eval(_config(data_dir))[0]
  assert batch['image'].shape == (4, NUM_FRAMES, SIZE, SIZE, 3)
  assert batch['label'].dtype == np.int32 and batch['mask'].dtype == bool
  low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
  assert np.all((batch['image'] >= low - 1e-5) & (batch['image'] <= high + 1e-5))


def test_train_clips_are_stride_spaced_windows_at_random_starts(data_dir):
  batches = _train(_plain_config(data_dir), 8)  # 4 epochs of 8 videos
  examples, frames = _decode_ids(np.concatenate([b['image'] for b in batches]))
  starts = {}
  for example, clip in zip(examples, frames):
    length = _length(example)
    start = clip[0]
    assert 0 <= start <= max(length - 5, 0)
    np.testing.assert_array_equal(clip, np.minimum(start + STRIDE * np.arange(3), length - 1))
    starts.setdefault(example, []).append(start)
  assert sorted(starts) == list(range(NUM_TRAIN)) and all(len(s) == 4 for s in starts.values())
  assert len(set(starts[3]) | set(starts[7])) > 1  # 13-frame videos: starts 0..8 vary
  assert set(starts[0]) == {0}                       # 2 frames: [0, 1, 1], last one repeated


# Frame indices of the eval clips per video length: view v of V starts at
# (length - 5) * (2v + 1) // (2V); too-short videos repeat their last frame.
CENTRED = {2: [0, 1, 1], 7: [1, 3, 5], 10: [2, 4, 6], 13: [4, 6, 8]}
THREE_VIEWS = {2: [[0, 1, 1]] * 3, 7: [[0, 2, 4], [1, 3, 5], [1, 3, 5]],
               10: [[0, 2, 4], [2, 4, 6], [4, 6, 8]], 13: [[1, 3, 5], [4, 6, 8], [6, 8, 10]]}


@pytest.mark.parametrize('views, expected', [(1, CENTRED), (3, THREE_VIEWS)])
def test_eval_takes_the_centred_clip_or_evenly_spaced_views(data_dir, views, expected):
  batches = _eval(_plain_config(data_dir, eval_views=views))
  clips = np.concatenate([b['image'][b['mask']] for b in batches])
  view_shape = (views,) if views > 1 else ()
  assert clips.shape == (NUM_EVAL, *view_shape, NUM_FRAMES, SIZE, SIZE, 3)
  examples, frames = _decode_ids(clips)
  if views > 1:
    assert np.all(examples == examples[:, :1])
    examples = examples[:, 0]
  assert sorted(examples) == list(range(NUM_EVAL))
  for example, clip_frames in zip(examples, frames):
    np.testing.assert_array_equal(clip_frames, expected[_length(example)])


def test_every_frame_of_a_clip_gets_the_same_augmentation(data_dir):
  # Still videos: any per-frame difference in crop, flip, RandAugment, erasing or CutMix box shows.
  augmented = _config(data_dir, image_key='still', augment='inception', reprob=1.0,
                      mixup=0.0, cutmix=1.0)
  plain = _plain_config(data_dir, image_key='still')
  for batch, plain_batch in zip(_train(augmented, 2), _train(plain, 2)):
    clips = batch['image']
    np.testing.assert_array_equal(clips, np.broadcast_to(clips[:, :1], clips.shape))
    assert not np.allclose(clips, plain_batch['image'], atol=0.1)  # augmentation did happen
    assert np.all(batch['label'].max(1) < 1.0)                    # and clips were mixed


def test_video_and_tensor_features_and_the_cache_give_the_same_clips(data_dir):
  configs = [_config(data_dir, 'video', augment='light'),
             _config(data_dir, 'video_tensor', augment='light'),
             _config(data_dir, 'video', augment='light', cache=True)]
  streams = [_train(config, 2, process=1, processes=2) for config in configs]
  for batches in zip(*streams):
    for batch in batches[1:]:
      np.testing.assert_array_equal(batch['image'], batches[0]['image'])
      np.testing.assert_array_equal(batch['label'], batches[0]['label'])


def test_train_stream_resumes_exactly(data_dir):
  config = _config(data_dir, augment='light', eval_views=2)
  # Batch 3 over 4-video shares: step 2 starts mid-epoch.
  stream = _train(config, 5, batch=3, process=1, processes=2)
  resumed = _train(config, 3, batch=3, process=1, processes=2, start_step=2)
  for expected, batch in zip(stream[2:], resumed):
    np.testing.assert_array_equal(batch['image'], expected['image'])
    np.testing.assert_array_equal(batch['label'], expected['label'])
  assert not np.array_equal(stream[0]['image'], stream[1]['image'])


def test_train_shares_cover_the_split_once_and_stay_per_process(data_dir):
  config = _plain_config(data_dir)
  ids = []
  for process in range(2):  # 8 videos / 2 processes = 4 per epoch = 2 batches of 2
    batches = _train(config, 4, batch=2, process=process, processes=2)
    examples, _ = _decode_ids(np.concatenate([b['image'] for b in batches]))
    labels = np.concatenate([b['label'] for b in batches])
    np.testing.assert_array_equal(labels, np.eye(NUM_CLASSES)[examples % NUM_CLASSES])
    ids.append(examples.reshape(2, 4))  # (epoch, position)
  ids = np.stack(ids)  # (process, epoch, position)
  assert sorted(ids[:, 0].ravel()) == list(range(NUM_TRAIN))
  for epoch_1, epoch_2 in ids:
    assert sorted(epoch_1) == sorted(epoch_2)


def test_eval_covers_every_video_once_with_padding_and_mask(data_dir):
  config = _plain_config(data_dir, eval_views=2)
  ids, counts = [], []
  for process in range(3):
    batches = _eval(config, batch=2, process=process, processes=3)
    counts.append(len(batches))
    for batch in batches:
      assert batch['image'].shape == (2, 2, NUM_FRAMES, SIZE, SIZE, 3)
      real = batch['mask']
      examples, _ = _decode_ids(batch['image'][real][:, 0])
      np.testing.assert_array_equal(batch['label'][real], examples % NUM_CLASSES)
      assert np.all(batch['image'][~real] == 0) and np.all(batch['label'][~real] == 0)
      ids.extend(examples)
  assert counts == [2, 2, 2]  # ceil(ceil(7 / 3) / 2)
  assert sorted(ids) == list(range(NUM_EVAL))


def test_a_video_dataset_read_as_images_names_the_fix(data_dir):
  with pytest.raises(ValueError, match="no Image feature 'video'.*num_frames > 0"):
    ip.get_dataset_info(_config(data_dir, num_frames=0))
  with pytest.raises(ValueError, match=r"no Video or uint8 Tensor \(L, H, W, 3\) feature 'clip'"):
    ip.get_dataset_info(_config(data_dir, image_key='clip'))


def test_kinetics_config_is_an_inflated_8x8_video_sparseformer_t():
  config = importlib.import_module('configs.video_sparseformer_t').get_config()
  assert (config.model.name, config.image_key) == ('sparseformer_v1_tiny', 'video')
  assert dict(config.model.overrides) == {'video': True, 'replicates': 2}
  assert config.init_inflate_replicates == 2
  assert (config.input.num_frames, config.input.temporal_stride) == (8, 8)
  assert config.input.image_size == 224


def test_video_smoke_config_reads_synthetic_motion_clips(tmp_path):
  config = importlib.import_module('configs.video_sparseformer_t').get_config('smoke')
  config.data_dir = os.fspath(tmp_path)
  assert dict(config.model.overrides) == dict(common.SMOKE_MODEL, video=True, replicates=2)
  assert (config.input.num_frames, config.input.image_size) == (8, 32)
  assert ip.get_dataset_info(config)['num_classes'] == 10  # generated; its video feature fits
