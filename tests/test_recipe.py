"""The training recipe against the official code's (docs/recipe.md).

timm cannot be imported beside the CPU build of torch here (no matching torchvision), so each
reference below is the formula read from the official SparseFormer code (imagenet/ of
showlab/sparseformer) and the timm release it installs (0.3.2), written out in numpy, with the
file and function it comes from.
"""
import importlib
import math
import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import torch

from test_model_fixtures import FIXTURES, TINY  # the official tiny checkpoints' model
from sparseformer_jax.data import mixup
from sparseformer_jax.data import randaugment
from sparseformer_jax.trainer.metrics import soft_target_cross_entropy
from sparseformer_jax.trainer import optim
from sparseformer_jax.trainer import train
from sparseformer_jax.weights import torch_checkpoint

RECIPE_LRS = dict(base_lr=5e-4, warmup_lr=5e-7, min_lr=5e-6, lr_base_batch_size=512)


def timm_cosine_lr(t, *, base, warmup, low, warmup_t, t_initial):
  """timm/scheduler/cosine_lr.py CosineLRScheduler._get_lr(t) with the official arguments
  (imagenet/lr_scheduler.py build_scheduler: t_mul=1, decay_rate=1, cycle_limit=1,
  warmup_prefix=False): the warm-up line, else the cosine over all t_initial steps."""
  if t < warmup_t:
    return warmup + t * (base - warmup) / warmup_t
  cycle = t // t_initial
  if cycle < 1:
    return low + 0.5 * (base - low) * (1 + math.cos(math.pi * (t - t_initial * cycle) / t_initial))
  return low


def official_lrs(num_updates, *, batch, warmup_t, t_initial):
  """The lr of each update of imagenet/main.py train_one_epoch.

  imagenet/main.py scales base, warm-up and min lr by the total batch / 512; the scheduler's
  constructor (timm/scheduler/scheduler.py Scheduler.__init__, CosineLRScheduler.__init__) sets
  the warm-up lr (or the base lr without warm-up) for the first update, and after update k the
  loop calls step_update(k), which sets _get_lr(k) for the next one.
  """
  scale = batch / 512
  lrs = dict(base=RECIPE_LRS['base_lr'] * scale, warmup=RECIPE_LRS['warmup_lr'] * scale,
             low=RECIPE_LRS['min_lr'] * scale, warmup_t=warmup_t, t_initial=t_initial)
  lr, out = (lrs['warmup'] if warmup_t else lrs['base']), []
  for k in range(num_updates):
    out.append(lr)
    lr = timm_cosine_lr(k, **lrs)
  return np.array(out)


@pytest.mark.parametrize('warmup_t', [7, 0])
def test_every_lr_of_a_full_schedule_is_the_official_one(warmup_t):
  config = ml_collections.ConfigDict(RECIPE_LRS)
  schedule = optim.learning_rate_schedule(config, global_batch_size=2048, total_steps=50,
                                          warmup_steps=warmup_t)
  ours = np.array([schedule(k) for k in range(50)])
  np.testing.assert_allclose(ours, official_lrs(50, batch=2048, warmup_t=warmup_t, t_initial=50),
                             rtol=2e-6)


def test_the_cosine_spans_all_steps_not_only_those_after_the_warm_up():
  # SF-T: 300 epochs of 1251 steps, 20 of warm-up. Halfway, the official cosine is at
  # min + (base - min) / 2; one that started after the warm-up would be 10% higher.
  config = ml_collections.ConfigDict(RECIPE_LRS)
  total, warmup = 375300, 25020
  schedule = optim.learning_rate_schedule(config, global_batch_size=1024, total_steps=total,
                                          warmup_steps=warmup)
  halfway = 2 * (RECIPE_LRS['min_lr'] + (RECIPE_LRS['base_lr'] - RECIPE_LRS['min_lr']) / 2)
  np.testing.assert_allclose(schedule(total // 2 + 1), halfway, rtol=1e-5)


def test_epochs_and_schedule_lengths_count_steps_as_the_official_loop():
  """imagenet/data/ra_sampler.py RASampler: floor(N // b * b / world) examples per process,
  DataLoader(drop_last=True) batches of b; imagenet/lr_scheduler.py: int(epochs * steps)."""
  n, per_gpu, world = 1281167, 128, 8
  steps_per_epoch = math.floor(n // per_gpu * per_gpu / world) // per_gpu
  config = ml_collections.ConfigDict(dict(global_batch_size=per_gpu * world, num_train_steps=-1,
                                          num_epochs=300.0, warmup_epochs=20.0,
                                          eval_every_steps=-1))
  assert train._schedule_steps(config, n) == (  # pylint: disable=protected-access
      int(300 * steps_per_epoch), int(20 * steps_per_epoch), steps_per_epoch)


def test_weight_decay_falls_on_the_params_the_official_optimizer_decays():
  """imagenet/optimizer.py set_weight_decay: no decay for 1-D params, names ending in '.bias',
  LayerNorm modules (their params are 1-D), and names starting with an entry of a module's
  no_weight_decay() (imagenet/models/sparseformer.py SparseFormer: ['token_roi'])."""
  path = os.path.join(FIXTURES, 'sf_v1_tiny_imagenet_format.pth')
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  state_dict = state_dict.get('model', state_dict)
  official_no_decay = {name for name, tensor in state_dict.items()
                       if tensor.ndim == 1 or name.endswith('.bias')
                       or name.startswith('token_roi')}
  model, variables = torch_checkpoint.load_torch_model(path, 'sparseformer_v1_tiny', **TINY)
  mask = optim.weight_decay_mask(variables['params'])
  ours_no_decay = {
      torch_checkpoint.torch_key(model.config, 'imagenet', tuple(k.key for k in keys))
      for keys, decays in jax.tree_util.tree_leaves_with_path(mask) if not decays}
  assert 'token_roi.weight' in official_no_decay
  assert 'token_embedding.weight' not in official_no_decay  # 2-D: decayed
  assert ours_no_decay == official_no_decay


def timm_cutmix_box(height, width, lam, cy, cx):
  """timm/data/mixup.py rand_bbox (margin 0, the centre given) and cutmix_bbox_and_lam
  (correct_lam=True, as Mixup's default): ((yl, yh, xl, xh), corrected lam)."""
  ratio = np.sqrt(1 - lam)
  cut_h, cut_w = int(height * ratio), int(width * ratio)
  yl, yh = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
  xl, xh = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
  return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(height * width)


def timm_mix_batch(images, labels, lam, box, num_classes, smoothing):
  """timm/data/mixup.py Mixup._mix_batch (mode 'batch') and mixup_target, on NHWC numpy:
  each example with the batch reversed (x.flip(0)); one-hot on = 1 - s + s / K, off = s / K."""
  images = images.copy()
  if box is None:
    images = images * lam + images[::-1] * (1 - lam)
  else:
    yl, yh, xl, xh = box
    images[:, yl:yh, xl:xh] = images[::-1][:, yl:yh, xl:xh]
  off = smoothing / num_classes
  one_hot = np.full((len(labels), num_classes), off)
  one_hot[np.arange(len(labels)), labels] = 1 - smoothing + off
  return images, one_hot * lam + one_hot[::-1] * (1 - lam)


@pytest.mark.parametrize('lam,cy,cx', [(0.3, 5, 9), (0.75, 0, 15), (0.05, 13, 2), (0.999, 7, 7),
                                       (0.5, 13, 0)])
def test_cutmix_box_and_corrected_lam_are_timms(lam, cy, cx):
  box, corrected = mixup.cutmix_box(tf.constant([cy, cx]), 14, 16, tf.constant(lam))
  want_box, want_lam = timm_cutmix_box(14, 16, lam, cy, cx)
  np.testing.assert_array_equal(box, want_box)
  np.testing.assert_allclose(corrected, want_lam, rtol=1e-6)


@pytest.mark.parametrize('use_cutmix', [False, True])
def test_mixed_images_and_targets_for_given_lam_and_box_are_timms(use_cutmix):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(6, 14, 16, 3)).astype(np.float32)
  labels = np.array([3, 1, 4, 1, 5, 9])
  cfg = mixup.MixupConfig(num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
                          switch_prob=0.5, label_smoothing=0.1, group_size=128)
  lam, center = 0.62, (4, 11)
  params = mixup.MixParams(tf.constant(lam), tf.constant(use_cutmix), tf.constant(center))
  mixed, targets = mixup.mix_group(tf.constant(images), tf.constant(labels), params, cfg)
  box, lam_used = timm_cutmix_box(14, 16, lam, *center) if use_cutmix else (None, lam)
  want_images, want_targets = timm_mix_batch(images, labels, lam_used, box, 10, 0.1)
  np.testing.assert_allclose(mixed, want_images, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(targets, want_targets, rtol=1e-6)


def test_smoothed_targets_give_timms_label_smoothing_cross_entropy():
  """timm/loss/cross_entropy.py LabelSmoothingCrossEntropy (the official loss without mixing):
  (1 - s) * nll + s * mean over classes of -log p."""
  rng = np.random.default_rng(1)
  logits, labels, s = rng.normal(size=(5, 10)), np.array([0, 3, 9, 3, 2]), 0.1
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = np.mean((1 - s) * -logp[np.arange(5), labels] + s * -logp.mean(-1))
  targets = mixup.smooth_one_hot(tf.constant(labels), 10, s).numpy()
  np.testing.assert_allclose(soft_target_cross_entropy(logits, targets), want, rtol=1e-5)


def timm_level_to_arg(name, level, negate):
  """timm/data/auto_augment.py LEVEL_TO_ARG (the *_level_to_arg functions, _MAX_LEVEL = 10,
  translate_pct 0.45), with _randomly_negate's coin given as `negate`."""
  sign = -1.0 if negate else 1.0
  table = {
      'Rotate': sign * level / 10 * 30, 'ShearX': sign * level / 10 * 0.3,
      'ShearY': sign * level / 10 * 0.3, 'TranslateXRel': sign * level / 10 * 0.45,
      'TranslateYRel': sign * level / 10 * 0.45,
      'PosterizeIncreasing': 4 - int(level / 10 * 4),
      'SolarizeIncreasing': 256 - int(level / 10 * 256), 'SolarizeAdd': int(level / 10 * 110)}
  for enhance in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    table[enhance + 'Increasing'] = 1.0 + sign * level / 10 * 0.9
  return table.get(name, 0.0)  # AutoContrast, Equalize, Invert take no argument


def test_randaugment_ops_and_their_arguments_are_timms_increasing_set():
  """timm/data/auto_augment.py _RAND_INCREASING_TRANSFORMS ('inc1'), in its order."""
  spec = randaugment.parse_randaugment('rand-m9-mstd0.5-inc1')
  assert spec == randaugment.RandAugmentSpec(magnitude=9.0, num_layers=2, magnitude_std=0.5,
                                             increasing=True, prob=0.5)
  assert randaugment.op_names(spec) == (
      'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
      'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
      'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
      'TranslateYRel')
  for op in randaugment._ops(spec.increasing):  # pylint: disable=protected-access
    for level in (0.0, 3.7, 9.0, 9.6, 10.0):
      for negate in (False, True):
        got = op.argument(tf.constant(level), tf.constant(negate))
        np.testing.assert_allclose(got, timm_level_to_arg(op.name, level, negate), rtol=1e-6,
                                   atol=1e-6, err_msg=f'{op.name} at {level}')


@pytest.mark.parametrize('name,drop_path_rate', [('sparseformer_t', 0.2), ('sparseformer_s', 0.3),
                                                 ('sparseformer_b', 0.4)])
def test_the_imagenet_configs_hold_the_official_values(name, drop_path_rate):
  """imagenet/config.py defaults and imagenet/configs/sparseformer_{t,s,b}.yaml: 8 GPUs x 128."""
  config = importlib.import_module(f'configs.{name}').get_config()
  official = {
      'global_batch_size': 8 * 128, 'num_epochs': 300, 'warmup_epochs': 20,
      'optimizer.base_lr': 5e-4, 'optimizer.warmup_lr': 5e-7, 'optimizer.min_lr': 5e-6,
      'optimizer.lr_base_batch_size': 512, 'optimizer.weight_decay': 0.05,
      'optimizer.b1': 0.9, 'optimizer.b2': 0.999, 'optimizer.eps': 1e-8,
      'optimizer.grad_clip_norm': 5.0, 'optimizer.ema_decay': 0.9999,
      'model.drop_path_rate': drop_path_rate, 'input.image_size': 224,
      'input.crop_pct': 224 / 256, 'input.randaugment': 'rand-m9-mstd0.5-inc1',
      'input.color_jitter': 0.4, 'input.reprob': 0.25, 'input.mixup': 0.8, 'input.cutmix': 1.0,
      'input.mixup_prob': 1.0, 'input.mixup_switch_prob': 0.5, 'input.mixup_group_size': 128,
      'input.label_smoothing': 0.1, 'input.repeated_aug': 3, 'input.augment': 'inception',
      'input.hflip': 0.5, 'input.scale': (0.08, 1.0), 'input.ratio': (3 / 4, 4 / 3),
      'eval_every_steps': -1, 'dtype': 'float32'}
  for dotted, value in official.items():
    got = config
    for part in dotted.split('.'):
      got = got[part]
    assert got == (tuple(value) if isinstance(value, tuple) else value), dotted
