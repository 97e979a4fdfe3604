"""Per-image transforms: crop boxes, train/eval transforms, erasing, jitter."""

import math

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from sparseformer_jax.data import augment
from sparseformer_jax.models.config import IMAGENET_MEAN, IMAGENET_STD
from sparseformer_jax.trainer import config_schema

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
LOW = (0 - np.array(IMAGENET_MEAN)) / IMAGENET_STD   # normalised black
HIGH = (1 - np.array(IMAGENET_MEAN)) / IMAGENET_STD  # normalised white


def _input_config(**overrides):
  """The schema's config.input (the recipe) at 32 px, with `overrides`."""
  config = config_schema.base_config().input
  config.update(dict(image_size=32, **overrides))
  return config


def _photo(height=40, width=56):
  """A smooth RGB image with structure in every direction."""
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([x * 4 + 10, y * 5 + 20, (x + 2 * y) % 200 + 30], -1).astype(np.uint8)


def test_crop_boxes_follow_timm_scale_and_ratio():
  for s in range(60):
    top, left, h, w = augment.sample_crop_box(tf.constant([s, 0]), tf.constant([40, 56]),
                                              SCALE, RATIO).numpy()
    assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 56
    # Rounding sides to pixels moves area and aspect a little past the range.
    assert 0.08 * 0.8 < h * w / (40 * 56) <= 1.0
    assert RATIO[0] * 0.85 < w / h < RATIO[1] * 1.15


def test_crop_box_falls_back_to_centre_crop_with_clamped_ratio():
  # No 90%-area crop of a 10x200 strip has an aspect ratio within [3/4, 4/3].
  box = augment.sample_crop_box(tf.constant([0, 0]), tf.constant([10, 200]), (0.9, 1.0), RATIO)
  np.testing.assert_array_equal(box, [0, (200 - 13) // 2, 10, round(10 * 4 / 3)])


def test_jpeg_partial_decode_uses_the_same_box_as_a_decoded_image():
  image = _photo()
  encoded = tf.io.encode_jpeg(image, quality=95)
  seed = tf.constant([3, 4])
  from_jpeg = augment.random_resized_crop(encoded, seed, 32, SCALE, RATIO)
  from_pixels = augment.random_resized_crop(tf.io.decode_jpeg(encoded), seed, 32, SCALE, RATIO)
  assert from_jpeg.shape == (32, 32, 3) and from_jpeg.dtype == tf.uint8
  # Chroma upsampling at the crop border differs slightly between the two decodes.
  assert np.abs(from_jpeg.numpy().astype(int) - from_pixels.numpy()).mean() < 2.0


@pytest.mark.parametrize('mode', config_schema.AUGMENT_MODES)
@pytest.mark.parametrize('encode', [tf.io.encode_jpeg, tf.io.encode_png])
def test_train_transform_shapes_and_ranges_for_small_images(mode, encode):
  config = _input_config(augment=mode, reprob=0.0)
  image = encode(_photo(20, 28))  # smaller than image_size: crops are upsampled
  out = augment.train_transform(image, tf.constant([1, 2]), config).numpy()
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  assert np.all(out >= LOW - 1e-5) and np.all(out <= HIGH + 1e-5)


def test_train_transform_is_a_pure_function_of_the_seed():
  config = _input_config(augment='inception', reprob=1.0)
  image = tf.io.encode_jpeg(_photo())
  first = augment.train_transform(image, tf.constant([5, 6]), config)
  np.testing.assert_array_equal(first, augment.train_transform(image, tf.constant([5, 6]), config))
  assert not np.array_equal(first, augment.train_transform(image, tf.constant([5, 7]), config))


def test_eval_transform_matches_pil_resize_and_centre_crop():
  image = _photo(40, 56)
  config = _input_config(crop_pct=0.875)
  out = augment.eval_transform(tf.io.encode_png(image), config).numpy()
  np.testing.assert_array_equal(out, augment.eval_transform(tf.constant(image), config))
  resize_to = int(256 / 224 * 32)                                    # 36, as the official eval
  new_w = int(resize_to * 56 / 40)                                   # 50, torchvision Resize
  pil = np.asarray(Image.fromarray(image).resize((new_w, resize_to), Image.BICUBIC))
  left = int(round((new_w - 32) / 2))
  expected = augment.normalize(pil[2:34, left:left + 32], IMAGENET_MEAN, IMAGENET_STD)
  np.testing.assert_allclose(out, expected, atol=1.5 / 255 / min(IMAGENET_STD))


def test_random_erasing_replaces_one_box_with_noise():
  image = tf.zeros([32, 32, 3])
  untouched = augment.random_erasing(image, tf.constant([0, 1]), prob=0.0)
  np.testing.assert_array_equal(untouched, image)
  for s in range(10):
    erased = augment.random_erasing(image, tf.constant([s, 1]), prob=1.0).numpy()
    rows, cols = np.nonzero(np.any(erased != 0, axis=-1))
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert len(rows) == box_area                                    # one solid box
    assert 0.02 * 0.8 < box_area / 1024 < 1 / 3 * 1.2
    assert abs(erased[rows, cols].std() - 1.0) < 0.3                 # N(0, 1) noise


def test_color_jitter_strength_zero_is_identity_and_otherwise_changes_colours():
  image = tf.constant(_photo())
  np.testing.assert_array_equal(augment.color_jitter(image, tf.constant([0, 0]), 0.0), image)
  jittered = augment.color_jitter(image, tf.constant([0, 0]), 0.4)
  assert jittered.dtype == tf.uint8 and not np.array_equal(jittered, image)


def test_normalize_uses_unit_interval_mean_and_std():
  pixel = tf.constant([[[255, 0, 51]]], tf.uint8)
  out = augment.normalize(pixel, mean=(0.5, 0.5, 0.2), std=(0.5, 0.25, 0.1))
  np.testing.assert_allclose(out, [[[1.0, -2.0, 0.0]]], atol=1e-6)


def test_resize_short_side_truncates_the_long_side_like_torchvision():
  out = augment.resize_short_side(tf.zeros([375, 500, 3], tf.uint8), 256)
  assert out.shape == (256, math.floor(256 * 500 / 375), 3)


def test_an_unknown_augment_mode_is_rejected_by_the_schema():
  config = config_schema.base_config()
  config.input.augment = 'heavy'
  with pytest.raises(config_schema.ConfigError, match="config.input.augment='heavy' is not one"):
    config_schema.validate_config(config)
