"""The SPEC §8 optimizer: lr schedule, AdamW with its no-decay mask, grad clip, EMA of params."""
import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(opt_config, *, global_batch_size: int, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  """Per-step lr: linear warm-up from warmup_lr, then cosine to min_lr at total_steps.

  All three lrs are scaled by global_batch_size / lr_base_batch_size (the linear scaling rule).
  """
  scale = global_batch_size / opt_config.lr_base_batch_size
  return optax.warmup_cosine_decay_schedule(
      init_value=opt_config.warmup_lr * scale,
      peak_value=opt_config.base_lr * scale,
      warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=opt_config.min_lr * scale)


def weight_decay_mask(params):
  """True where weight decay applies: not 1-D params (biases, norms, betas), not initial_roi."""
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
