"""The label-free bootstrapping task (config.task = 'bootstrap'): what the trainer does
differently when a SparseFormer learns to match a pretrained ViT.

The teacher's weights come from config.bootstrap.teacher; the student inherits its last blocks,
CLS token, final norm and head (weights/inherit.py). Each train step runs the teacher on the
batch without gradients and minimizes 1 - cos(student output, teacher output), the output being
the head's (the classifier's logits, or CLIP's projected embedding); labels are never read.
The inherited blocks that stay frozen join config.optimizer.frozen: no gradient, no optimizer
state (trainer/optim.py).
Evaluation: cosine similarity to the teacher, and where the teacher's head classifies the
dataset's classes, top-1/top-5 with that head and top-1 agreement with the teacher.
"""
import logging

import jax
import jax.numpy as jnp
from flax import traverse_util

from sparseformer_jax.ops.sub_batches import apply_in_sub_batches
from sparseformer_jax.trainer import config_schema
from sparseformer_jax.trainer import metrics as metrics_lib
from sparseformer_jax.weights import inherit
from sparseformer_jax.weights.vit_checkpoint import load_vit


def alignment_loss(outputs, targets):
  """Mean over the batch of 1 - cos(outputs, targets); both (B, E), float32."""
  outputs, targets = outputs.astype(jnp.float32), targets.astype(jnp.float32)
  return 1.0 - jnp.mean(cosine_similarity(outputs, targets))


def cosine_similarity(a, b, eps=1e-8):
  """(B,) cosine similarity of the rows of a and b (B, E)."""
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, eps)


def _is_frozen(path, frozen) -> bool:
  keys = tuple(getattr(k, 'key', k) for k in path)
  return any(keys[:len(f)] == f for f in frozen)


class Bootstrap:
  """The teacher, the inheritance map and the loss/eval of one bootstrapping run."""

  def __init__(self, config, dataset_classes: int):
    boot = config.bootstrap
    try:
      self.teacher, variables, size = load_vit(boot.teacher, activation=boot.teacher_activation,
                                               num_heads=boot.teacher_num_heads,
                                               dtype=config.dtype)
    except (OSError, ValueError) as e:
      raise config_schema.ConfigError(f'config.bootstrap.teacher={boot.teacher!r}: {e}') from e
    self.teacher_params = variables['params']
    if config.input.image_size != size:
      raise config_schema.ConfigError(
          f'The teacher {boot.teacher} takes {size}x{size} images (its position embedding), '
          f'config.input.image_size is {config.input.image_size}: set '
          f'--config.input.image_size={size}.')
    self.first_frozen = boot.first_frozen_block
    self.sub_batches = config.sub_batches
    self.num_classes = self.teacher.config.num_classes
    # Top-1 with the teacher's head means something when it classifies the dataset's classes.
    self.classifies = self.num_classes == dataset_classes
    self.frozen = ()

  def with_frozen(self, config, student_cfg):
    """A copy of `config` whose optimizer.frozen also names the inherited params that stay
    frozen (the trainer then gives them no gradient and no optimizer state)."""
    try:
      _, frozen = inherit.inheritance(student_cfg, self.teacher.config, self.first_frozen)
    except ValueError as e:
      raise config_schema.ConfigError(f'config.model vs config.bootstrap.teacher: {e}') from e
    self.frozen = tuple(frozen)
    config = config.copy_and_resolve_references()
    config.optimizer.frozen = ','.join(
        [p for p in config.optimizer.frozen.split(',') if p.strip()] +
        ['/'.join(path) for path in self.frozen])
    return config

  def inherit(self, params, student_cfg):
    """The fresh student params (host arrays) with the teacher's weights copied in."""
    params, _ = inherit.inherit_from_vit(jax.device_get(params), student_cfg,
                                         self.teacher_params, self.teacher.config,
                                         self.first_frozen)
    flat = traverse_util.flatten_dict(params)
    frozen = sum(v.size for p, v in flat.items() if _is_frozen(p, self.frozen))
    logging.info('Bootstrapping from %s: %d of %d params frozen.', self.teacher.config,
                 frozen, sum(v.size for v in flat.values()))
    return params

  def targets(self, teacher_params, images):
    """The teacher's outputs (B, E) on the images, float32, without gradient."""
    out = apply_in_sub_batches(
        lambda x, _: self.teacher.apply({'params': teacher_params}, x, train=False),
        images, self.sub_batches)
    return jax.lax.stop_gradient(out)

  def make_eval_step(self, model):
    """(params, ema_params, batch, teacher_params) -> summed counts and cosines."""
    top_k = min(5, self.num_classes)

    def eval_step(params, ema_params, batch, teacher_params):
      mask = batch['mask']
      teacher = self.targets(teacher_params, batch['image'])
      counts = {'val/num_examples': mask.sum(dtype=jnp.int32)}
      if self.classifies:
        correct = metrics_lib.topk_correct(teacher, batch['label'], 1) & mask
        counts['val/teacher_top1'] = correct.sum(dtype=jnp.int32)
      for prefix, p in (('val', params), ('ema_val', ema_params)):
        out = apply_in_sub_batches(
            lambda x, _, p=p: model.apply({'params': p}, x, train=False), batch['image'],
            self.sub_batches)
        counts[f'{prefix}/cosine'] = jnp.sum(jnp.where(mask, cosine_similarity(out, teacher), 0))
        if self.classifies:
          for k, name in ((1, 'top1'), (top_k, 'top5')):
            correct = metrics_lib.topk_correct(out, batch['label'], k) & mask
            counts[f'{prefix}/{name}'] = correct.sum(dtype=jnp.int32)
          agree = (out.argmax(-1) == teacher.argmax(-1)) & mask
          counts[f'{prefix}/agreement'] = agree.sum(dtype=jnp.int32)
      return counts
    return eval_step
