"""Batch Mixup / CutMix: soft targets, which pairs get mixed, and the mode switch."""

import ml_collections
import numpy as np
import tensorflow as tf

from sparseformer_jax.data import mixup

BATCH, CLASSES = 6, 10


def _batch():
  """Image i is constant with value i, its label is i: mixing is readable from pixels."""
  images = tf.broadcast_to(tf.range(BATCH, dtype=tf.float32)[:, None, None, None], [BATCH, 8, 8, 3])
  return images, tf.range(BATCH)


def _mix(seed, **fields):
  cfg = mixup.MixupConfig(num_classes=CLASSES, **fields)
  images, targets = mixup.mix_batch(*_batch(), tf.constant([seed, 0]), cfg)
  return images.numpy(), targets.numpy()


def _partner(i):
  return BATCH - 1 - i


def test_config_reads_input_fields_with_timm_defaults():
  cfg = mixup.MixupConfig.from_config(ml_collections.ConfigDict({'cutmix': 0.0}), 7)
  assert cfg == mixup.MixupConfig(num_classes=7, mixup_alpha=0.8, cutmix_alpha=0.0,
                                  prob=1.0, switch_prob=0.5, label_smoothing=0.1)


def test_label_smoothing_only():
  images, targets = _mix(0, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)
  np.testing.assert_array_equal(images, _batch()[0])
  expected = np.full((BATCH, CLASSES), 0.01, np.float32)
  expected[np.arange(BATCH), np.arange(BATCH)] = 0.91
  np.testing.assert_allclose(targets, expected, rtol=1e-6)


def test_mixup_blends_each_example_with_its_reverse_partner():
  for seed in range(5):
    images, targets = _mix(seed, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    lam = targets[0, 0]
    for i in range(BATCH):
      np.testing.assert_allclose(images[i], lam * i + (1 - lam) * _partner(i), atol=1e-5)
      if i != _partner(i):
        np.testing.assert_allclose(targets[i, [i, _partner(i)]], [lam, 1 - lam], atol=1e-6)


def test_cutmix_pastes_one_box_from_the_partner_with_area_matched_targets():
  for seed in range(5):
    images, targets = _mix(seed, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    pasted = images[0, ..., 0] == _partner(0)                  # (H, W) box mask
    for i in range(BATCH):
      assert set(np.unique(images[i])) <= {i, _partner(i)}
      np.testing.assert_array_equal(images[i, ..., 0] == _partner(i), pasted)
    lam = 1.0 - pasted.mean()
    smooth = mixup.smooth_one_hot(tf.range(BATCH), CLASSES, 0.1).numpy()
    np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], atol=1e-6)


def _uses_cutmix(images):
  """CutMix keeps pixel values integral here; Mixup blends them."""
  return np.allclose(images, np.round(images))


def test_switch_probability_chooses_between_mixup_and_cutmix():
  modes = [_uses_cutmix(_mix(seed, switch_prob=0.5)[0]) for seed in range(40)]
  assert 8 < sum(modes) < 32
  assert not any(_uses_cutmix(_mix(seed, switch_prob=0.0)[0]) for seed in range(10))
  assert all(_uses_cutmix(_mix(seed, switch_prob=1.0)[0]) for seed in range(10))


def test_mix_probability_zero_leaves_the_batch_unmixed():
  images, targets = _mix(3, prob=0.0, label_smoothing=0.0)
  np.testing.assert_array_equal(images, _batch()[0])
  np.testing.assert_array_equal(targets, np.eye(CLASSES)[:BATCH])


def test_mixing_is_a_pure_function_of_the_seed():
  first = _mix(11)
  np.testing.assert_array_equal(first[0], _mix(11)[0])
  assert not np.array_equal(first[0], _mix(12)[0])
