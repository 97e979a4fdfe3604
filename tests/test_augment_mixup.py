"""Batch Mixup / CutMix: soft targets, which pairs get mixed, the mode switch, the groups."""

import dataclasses

import numpy as np
import tensorflow as tf

from sparseformer_jax.data import mixup
from sparseformer_jax.trainer.config_schema import base_config

BATCH, CLASSES = 6, 10
RECIPE = mixup.MixupConfig.from_config(base_config().input, CLASSES)


def _batch():
  """Image i is constant with value i, its label is i: mixing is readable from pixels."""
  images = tf.broadcast_to(tf.range(BATCH, dtype=tf.float32)[:, None, None, None], [BATCH, 8, 8, 3])
  return images, tf.range(BATCH)


def _mix(seed, **fields):
  cfg = dataclasses.replace(RECIPE, **fields)
  images, targets = mixup.mix_batch(*_batch(), tf.constant([seed, 0]), cfg)
  return images.numpy(), targets.numpy()


def _partner(i):
  return BATCH - 1 - i


def test_config_reads_the_recipe_fields_of_config_input():
  assert RECIPE == mixup.MixupConfig(num_classes=CLASSES, mixup_alpha=0.8, cutmix_alpha=1.0,
                                     prob=1.0, switch_prob=0.5, label_smoothing=0.1,
                                     group_size=128)


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


def _interleaved_batch(batch):
  images = tf.broadcast_to(tf.range(batch, dtype=tf.float32)[:, None, None, None],
                           [batch, 8, 8, 3])
  return images, tf.range(batch)


def test_groups_of_interleaved_rows_are_mixed_each_with_its_own_draw():
  # Batch 8 in groups of 4: group 0 = rows 0, 2, 4, 6 and group 1 = rows 1, 3, 5, 7, as the
  # official per-GPU batches take every G-th example of the repeated-augmentation order.
  cfg = dataclasses.replace(RECIPE, cutmix_alpha=0.0, label_smoothing=0.0, group_size=4,
                            num_classes=8)
  lams = set()
  for seed in range(4):
    images, targets = mixup.mix_batch(*_interleaved_batch(8), tf.constant([seed, 1]), cfg)
    for group in (0, 1):
      rows = np.arange(group, 8, 2)
      lam = targets[rows[0], rows[0]].numpy()
      for row, partner in zip(rows, rows[::-1]):
        np.testing.assert_allclose(images[row], lam * row + (1 - lam) * partner, atol=1e-5)
      lams.add(round(float(lam), 6))
  assert len(lams) == 8  # every group of every batch drew its own lambda


def test_a_batch_that_is_no_multiple_of_the_group_size_splits_into_interleaved_groups():
  # Batch 7 in groups of 3: 2 groups, rows 0, 2, 4, 6 and rows 1, 3, 5.
  cfg = dataclasses.replace(RECIPE, cutmix_alpha=0.0, label_smoothing=0.0, group_size=3,
                            num_classes=7)
  images, targets = mixup.mix_batch(*_interleaved_batch(7), tf.constant([0, 2]), cfg)
  for rows in (np.arange(0, 7, 2), np.arange(1, 7, 2)):
    lam = targets[rows[0], rows[0]].numpy()
    for row, partner in zip(rows, rows[::-1]):
      np.testing.assert_allclose(images[row], lam * row + (1 - lam) * partner, atol=1e-5)
