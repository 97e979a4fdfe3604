"""The recipe's optimizer (docs/recipe.md): lr schedule, AdamW with its no-decay mask, grad clip,
EMA of params; for fine-tuning, layer-wise lr decay and frozen params."""
import fnmatch

import jax
import jax.numpy as jnp
import optax

from sparseformer_jax.trainer.config_schema import ConfigError


def learning_rate_schedule(opt_config, *, global_batch_size: int, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  """The lr of update number `count` (0, 1, ...), as the official recipe sets it.

  The curve is timm's CosineLRScheduler(t_initial=total_steps, warmup_t=warmup_steps,
  warmup_lr_init=warmup_lr, lr_min=min_lr, warmup_prefix=False): lr(t) rises linearly from
  warmup_lr for t < warmup_steps, then is the cosine from base_lr at t = 0 to min_lr at
  t = total_steps, i.e. the cosine spans ALL steps and is not shifted by the warm-up. The official
  loop sets the lr for the next update after each one (step_update(t) after update t), so update
  k >= 1 uses lr(k - 1) and update 0 uses warmup_lr. All three lrs are scaled by
  global_batch_size (the examples of one update, every micro-batch included) / lr_base_batch_size.
  """
  scale = global_batch_size / opt_config.lr_base_batch_size
  base, warmup_lr, min_lr = (scale * lr for lr in (opt_config.base_lr, opt_config.warmup_lr,
                                                    opt_config.min_lr))

  def schedule(count):
    t = jnp.maximum(jnp.asarray(count, jnp.float32) - 1.0, 0.0)
    rising = warmup_lr + t * (base - warmup_lr) / max(warmup_steps, 1)
    cosine = min_lr + 0.5 * (base - min_lr) * (1.0 + jnp.cos(jnp.pi * t / total_steps))
    return jnp.where(t < warmup_steps, rising, jnp.where(t < total_steps, cosine, min_lr))
  return schedule


def weight_decay_mask(params):
  """True where weight decay applies: not 1-D params (biases, norms, betas), not initial_roi.

  The official rule on its names: no decay for 1-D params, biases, LayerNorms and token_roi
  (no_weight_decay()); our biases and norm scales are 1-D too (tests/test_recipe.py).
  """
  def decays(path, leaf):
    name = path[-1].key if hasattr(path[-1], 'key') else str(path[-1])
    return leaf.ndim > 1 and name != 'initial_roi'
  return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(opt_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW (decoupled decay, masked) at the scheduled lr."""
  adamw = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                      weight_decay=opt_config.weight_decay, mask=weight_decay_mask)
  if opt_config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), adamw)
  return adamw


def ema_update(ema_params, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf (as ema + (1 - decay) * (params -
  ema): the EMA of a param that does not change, e.g. a frozen one, stays bit-equal)."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)


def tree_where(condition: jnp.ndarray, new_tree, old_tree):
  """new_tree where the scalar `condition` holds, else old_tree (a step that is not applied)."""
  return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new_tree, old_tree)


# Fine-tuning: layer-wise lr decay and frozen params, wrapped around the optimizer above.

def _path_name(path) -> str:
  """A param's tree path as 'cortex/unit_0/mlp/fc1/kernel'."""
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def _layer_id(name: str, num_cortex_units: int) -> int:
  """0 for the stem and the initial embeddings/RoIs (and the CLS embedding), 1 for the focusing
  unit, 2 + k for cortex unit k (the transition counts with unit 0), num units + 1 for the head
  and its norm."""
  parts = name.split('/')
  if parts[0] in ('head', 'head_norm'):
    return num_cortex_units + 2
  if parts[0] == 'cortex' and parts[1].startswith('unit_'):
    return 2 + int(parts[1][len('unit_'):])
  if parts[0] in ('transition', 'transition_norm'):
    return 2
  if parts[0] == 'focusing':
    return 1
  if parts[0] in ('stem', 'initial_roi', 'initial_embedding') or name == 'cortex/cls_embedding':
    return 0
  raise ConfigError(f'config.optimizer.layer_decay: no layer is known for the param {name}; '
                   'set layer_decay=1.0 for this model.')


def layer_decay_scales(params, decay: float):
  """The lr multiplier of every param: 1 for the head, decay**k for the k-th unit before it;
  the stem and the initial embeddings/RoIs come last (decay**(units + 1))."""
  names = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  units = len({n.split('/')[1] for n in names if n.startswith('cortex/unit_')})
  top = units + 2
  return jax.tree_util.tree_map_with_path(
      lambda path, _: decay ** (top - _layer_id(_path_name(path), units)), params)


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its param's layer_decay_scales (the lr of its layer)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, layer_decay_scales(updates, decay)), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def frozen_mask(params, opt_config):
  """True for the params that do not train: those matching a pattern of optimizer.frozen
  (comma-separated globs on param paths such as 'stem' or 'cortex/unit_[01]', a pattern also
  freezing everything under it), or, with optimizer.linear_probe, all but the head."""
  patterns = [p.strip().strip('/') for p in opt_config.frozen.split(',') if p.strip()]
  names = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

  def frozen(name):
    if opt_config.linear_probe and not name.startswith('head/'):
      return True
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + '/*')
               for p in patterns)
  unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) or
                                              fnmatch.fnmatchcase(n, p + '/*') for n in names)]
  if unmatched:
    tops = sorted({'/'.join(n.split('/')[:2]) for n in names})
    raise ConfigError(f'config.optimizer.frozen: {", ".join(unmatched)} matches no param; the '
                     f'params are under {", ".join(tops)}.')
  return jax.tree_util.tree_map_with_path(lambda path, _: frozen(_path_name(path)), params)


def _freezes(opt_config) -> bool:
  return bool(opt_config.frozen.strip()) or opt_config.linear_probe


def with_finetuning(tx: optax.GradientTransformation, opt_config) -> optax.GradientTransformation:
  """`tx` for the trainable params only (frozen ones get zero updates and keep no optimizer
  state), then the layer-wise lr decay of optimizer.layer_decay (1 = off)."""
  if _freezes(opt_config):
    tx = optax.multi_transform(
        {'train': tx, 'frozen': optax.set_to_zero()},
        lambda params: jax.tree.map(lambda f: 'frozen' if f else 'train',
                                    frozen_mask(params, opt_config)))
  if opt_config.layer_decay < 1.0:
    tx = optax.chain(tx, scale_by_layer_decay(opt_config.layer_decay))
  return tx


def stop_frozen_gradients(params, opt_config):
  """`params` with the frozen ones behind stop_gradient: no backward pass is spent on them, and
  the logged gradient norm is the trainable params'."""
  if not _freezes(opt_config):
    return params
  return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params,
                      frozen_mask(params, opt_config))
