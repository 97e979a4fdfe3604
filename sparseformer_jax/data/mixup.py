"""Batch-level Mixup / CutMix with label smoothing (timm's Mixup, mode='batch'), per group.

The official recipe mixes each GPU's batch of 128 on its own; here a host's batch of B is split
into G = max(B // input.mixup_group_size, 1) groups of interleaved rows (group g = rows g, g + G,
...): the copies of a repeated-augmentation image, which sit next to each other, land in
different groups, as the official sampler puts them on different GPUs. Each group draws its own
(lambda, mixup-or-cutmix): with probability `prob` the group is mixed with its reverse (example i
with example n-1-i). CutMix is chosen with probability `switch_prob` when both alphas are positive;
its box has a uniform centre, is clipped to the image, and lambda is corrected to the pasted
box's true area. Labels become label-smoothed one-hot vectors mixed with the same lambda, so
every target row sums to 1. All draws come from an explicit seed (stateless), so a batch's mix
is a pure function of (images, labels, seed).

Reads config.input fields: mixup, cutmix, mixup_prob, mixup_switch_prob, label_smoothing,
mixup_group_size (their meaning and defaults: trainer/config_schema.py base_config()).
"""

import dataclasses
from typing import NamedTuple

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class MixupConfig:
  """The mixing fields of config.input, and the class count."""
  num_classes: int
  mixup_alpha: float
  cutmix_alpha: float
  prob: float
  switch_prob: float
  label_smoothing: float
  group_size: int

  @classmethod
  def from_config(cls, input_config, num_classes: int) -> 'MixupConfig':
    return cls(num_classes=num_classes, mixup_alpha=input_config.mixup,
               cutmix_alpha=input_config.cutmix, prob=input_config.mixup_prob,
               switch_prob=input_config.mixup_switch_prob,
               label_smoothing=input_config.label_smoothing,
               group_size=input_config.mixup_group_size)


class MixParams(NamedTuple):
  """How one group is mixed."""
  lam: tf.Tensor         # float32 scalar, weight of the un-flipped group (before box correction)
  use_cutmix: tf.Tensor  # bool scalar
  center: tf.Tensor      # int32 (2,): the CutMix box centre (row, column)


def smooth_one_hot(labels, num_classes: int, smoothing: float) -> tf.Tensor:
  """int (B,) -> float32 (B, num_classes): 1 - s + s/K on the label, s/K elsewhere."""
  off = smoothing / num_classes
  return tf.one_hot(labels, num_classes, on_value=1.0 - smoothing + off, off_value=off)


def _beta(seed, alpha: float) -> tf.Tensor:
  """Beta(alpha, alpha) sample as a ratio of two gamma draws."""
  g = tf.random.stateless_gamma([2], seed, alpha=alpha)
  return g[0] / (g[0] + g[1])


def sample_mix_params(seed, cfg: MixupConfig, height: int, width: int) -> MixParams:
  """Decides whether and how to mix one group (timm's _params_per_batch and rand_bbox's centre)."""
  apply_seed, switch_seed, mixup_seed, cutmix_seed, center_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  center = tf.stack([tf.random.stateless_uniform([], s, 0, side, dtype=tf.int32) for s, side in
                    zip(tf.unstack(tf.random.experimental.stateless_split(center_seed, 2)),
                        (height, width))])
  if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
    return MixParams(tf.constant(1.0), tf.constant(False), center)
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    use_cutmix = tf.random.stateless_uniform([], switch_seed) < cfg.switch_prob
  else:
    use_cutmix = tf.constant(cfg.cutmix_alpha > 0)
  mixup_lam = _beta(mixup_seed, cfg.mixup_alpha) if cfg.mixup_alpha > 0 else 1.0
  cutmix_lam = _beta(cutmix_seed, cfg.cutmix_alpha) if cfg.cutmix_alpha > 0 else 1.0
  apply = tf.random.stateless_uniform([], apply_seed) < cfg.prob
  lam = tf.where(apply, tf.where(use_cutmix, cutmix_lam, mixup_lam), 1.0)
  return MixParams(tf.cast(lam, tf.float32), use_cutmix & apply, center)


def cutmix_box(center, height: int, width: int, lam) -> tuple[tf.Tensor, tf.Tensor]:
  """The box of side fractions sqrt(1 - lam) about `center`, clipped to the image (timm).

  Returns ((top, bottom, left, right) int32, lam corrected to 1 - box area / image area).
  """
  cut_ratio = tf.sqrt(1.0 - tf.cast(lam, tf.float32))
  cut_h = tf.cast(height * cut_ratio, tf.int32)
  cut_w = tf.cast(width * cut_ratio, tf.int32)
  cy, cx = tf.unstack(tf.cast(center, tf.int32))
  top, bottom = (tf.clip_by_value(v, 0, height) for v in (cy - cut_h // 2, cy + cut_h // 2))
  left, right = (tf.clip_by_value(v, 0, width) for v in (cx - cut_w // 2, cx + cut_w // 2))
  area = tf.cast((bottom - top) * (right - left), tf.float32)
  return tf.stack([top, bottom, left, right]), 1.0 - area / float(height * width)


def _cutmix(images, flipped, center, lam):
  """Pastes the same box of `flipped` into every image; returns (images, corrected lam)."""
  _, height, width, _ = images.shape
  box, lam = cutmix_box(center, height, width, lam)
  top, bottom, left, right = tf.unstack(box)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # (H, W)
  return tf.where(inside[None, :, :, None], flipped, images), lam


def mix_group(images, labels, params: MixParams, cfg: MixupConfig):
  """One group as timm's Mixup(mode='batch') mixes a batch with `params`.

  images (n, H, W, C) float32, labels (n,) int -> (mixed images, soft targets (n, K)).
  """
  flipped = tf.reverse(images, axis=[0])
  images, lam = tf.cond(
      params.use_cutmix,
      lambda: _cutmix(images, flipped, params.center, params.lam),
      lambda: (params.lam * images + (1.0 - params.lam) * flipped, params.lam))
  targets = smooth_one_hot(labels, cfg.num_classes, cfg.label_smoothing)
  return images, lam * targets + (1.0 - lam) * tf.reverse(targets, axis=[0])


def mix_batch(images, labels, seed, cfg: MixupConfig):
  """images (B, H, W, C) float32, labels (B,) int -> (mixed images, soft targets (B, K)).

  G = max(B // group_size, 1) groups; group g (rows g, g + G, ...) is mixed on its own, with its
  own draws.
  """
  batch, height, width = images.shape[:3]
  groups = max(batch // cfg.group_size, 1)
  seeds = tf.random.experimental.stateless_split(seed, groups)
  mixed = [mix_group(images[g::groups], labels[g::groups],
                     sample_mix_params(seeds[g], cfg, height, width), cfg)
           for g in range(groups)]
  rows = [tf.range(g, batch, groups) for g in range(groups)]
  return (tf.ensure_shape(tf.dynamic_stitch(rows, [m[0] for m in mixed]), images.shape),
          tf.ensure_shape(tf.dynamic_stitch(rows, [m[1] for m in mixed]),
                          [batch, cfg.num_classes]))
