"""Batch-level Mixup / CutMix with label smoothing (timm's Mixup, mode='batch').

One (lambda, mixup-or-cutmix) draw per batch: with probability `prob` the batch
is mixed with its reverse (example i with example B-1-i). CutMix is chosen
with probability `switch_prob` when both alphas are positive; its lambda is
corrected to the pasted box's true area. Labels become label-smoothed one-hot
vectors mixed with the same lambda, so every target row sums to 1. All draws
come from an explicit seed (stateless), so a batch's mix is a pure function of
(images, labels, seed).

Reads config.input fields: mixup, cutmix, mixup_prob, mixup_switch_prob,
label_smoothing (see input_pipeline.py).
"""

import dataclasses
from typing import NamedTuple

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class MixupConfig:
  num_classes: int
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.1

  @classmethod
  def from_config(cls, input_config, num_classes: int) -> 'MixupConfig':
    """Reads the mixup fields of config.input (timm/DeiT defaults when absent)."""
    defaults = cls(num_classes)
    return cls(
        num_classes=num_classes,
        mixup_alpha=input_config.get('mixup', defaults.mixup_alpha),
        cutmix_alpha=input_config.get('cutmix', defaults.cutmix_alpha),
        prob=input_config.get('mixup_prob', defaults.prob),
        switch_prob=input_config.get('mixup_switch_prob', defaults.switch_prob),
        label_smoothing=input_config.get('label_smoothing', defaults.label_smoothing))


class MixParams(NamedTuple):
  lam: tf.Tensor         # float32 scalar, weight of the un-flipped batch
  use_cutmix: tf.Tensor  # bool scalar


def smooth_one_hot(labels, num_classes: int, smoothing: float) -> tf.Tensor:
  """int (B,) -> float32 (B, num_classes): 1 - s + s/K on the label, s/K elsewhere."""
  off = smoothing / num_classes
  return tf.one_hot(labels, num_classes, on_value=1.0 - smoothing + off, off_value=off)


def _beta(seed, alpha: float) -> tf.Tensor:
  """Beta(alpha, alpha) sample as a ratio of two gamma draws."""
  g = tf.random.stateless_gamma([2], seed, alpha=alpha)
  return g[0] / (g[0] + g[1])


def sample_mix_params(seed, cfg: MixupConfig) -> MixParams:
  """Decides whether and how to mix one batch (timm's _params_per_batch)."""
  apply_seed, switch_seed, mixup_seed, cutmix_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
    return MixParams(tf.constant(1.0), tf.constant(False))
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    use_cutmix = tf.random.stateless_uniform([], switch_seed) < cfg.switch_prob
  else:
    use_cutmix = tf.constant(cfg.cutmix_alpha > 0)
  mixup_lam = _beta(mixup_seed, cfg.mixup_alpha) if cfg.mixup_alpha > 0 else 1.0
  cutmix_lam = _beta(cutmix_seed, cfg.cutmix_alpha) if cfg.cutmix_alpha > 0 else 1.0
  apply = tf.random.stateless_uniform([], apply_seed) < cfg.prob
  lam = tf.where(apply, tf.where(use_cutmix, cutmix_lam, mixup_lam), 1.0)
  return MixParams(tf.cast(lam, tf.float32), use_cutmix & apply)


def cutmix_box(seed, height: int, width: int, lam) -> tuple[tf.Tensor, tf.Tensor]:
  """Box of area ~(1 - lam) at a uniform centre, clipped to the image.

  Returns ((top, bottom, left, right) int32, lam corrected to 1 - box area).
  """
  cy_seed, cx_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  cut_ratio = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(height * cut_ratio, tf.int32)
  cut_w = tf.cast(width * cut_ratio, tf.int32)
  cy = tf.random.stateless_uniform([], cy_seed, 0, height, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], cx_seed, 0, width, dtype=tf.int32)
  top, bottom = (tf.clip_by_value(v, 0, height) for v in (cy - cut_h // 2, cy + cut_h // 2))
  left, right = (tf.clip_by_value(v, 0, width) for v in (cx - cut_w // 2, cx + cut_w // 2))
  area = tf.cast((bottom - top) * (right - left), tf.float32)
  return tf.stack([top, bottom, left, right]), 1.0 - area / float(height * width)


def _cutmix(images, flipped, seed, lam):
  """Pastes the same box of `flipped` into every image; returns (images, lam)."""
  _, height, width, _ = images.shape
  box, lam = cutmix_box(seed, height, width, lam)
  top, bottom, left, right = tf.unstack(box)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # (H, W)
  return tf.where(inside[None, :, :, None], flipped, images), lam


def mix_batch(images, labels, seed, cfg: MixupConfig):
  """images (B, H, W, C) float32, labels (B,) int -> (mixed images, soft targets (B, K))."""
  params_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  lam, use_cutmix = sample_mix_params(params_seed, cfg)
  flipped = tf.reverse(images, axis=[0])
  images, lam = tf.cond(
      use_cutmix,
      lambda: _cutmix(images, flipped, box_seed, lam),
      lambda: (lam * images + (1.0 - lam) * flipped, lam))
  targets = smooth_one_hot(labels, cfg.num_classes, cfg.label_smoothing)
  return images, lam * targets + (1.0 - lam) * tf.reverse(targets, axis=[0])
