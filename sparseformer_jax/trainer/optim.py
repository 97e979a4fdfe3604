"""The recipe's optimizer (docs/recipe.md): lr schedule, AdamW with its no-decay mask, grad clip,
EMA of params."""
import jax
import jax.numpy as jnp
import optax


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
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
  return jax.tree.map(lambda e, p: e * decay + p * (1.0 - decay), ema_params, params)


def tree_where(condition: jnp.ndarray, new_tree, old_tree):
  """new_tree where the scalar `condition` holds, else old_tree (a step that is not applied)."""
  return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new_tree, old_tree)
