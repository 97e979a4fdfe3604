"""Recipe pieces shared by the configs in this directory.

Every field and its default (the official ImageNet-1K recipe, compared step for step with the
official code in docs/recipe.md) lives in sparseformer_jax/trainer/config_schema.py:base_config();
a config changes only what differs.
"""
import ml_collections

from sparseformer_jax.trainer.config_schema import base_config

# The numerics of the official training code (imagenet/, which trained the released weights):
# its stem and offset statistics and the clamped sampling-point gradient (docs/model.md §1, §3).
# create_model's defaults are the library's, in which the released weights are evaluated; a run
# whose init_from holds official weights computes in theirs (trainer/train.py _init_numerics).
TRAINING_NUMERICS = dict(flavor='imagenet', grad_clamp=True)

# create_model overrides of the smoke model: every stage present, as small as it gets.
SMOKE_MODEL = dict(conv_dim=16, num_tokens=9, num_points=4, focusing_width=32, focusing_repeats=2,
                   cortex_width=64, cortex_depth=2, num_heads=4)


def imagenet_config(model_name: str, drop_path_rate: float, arg: str = ''):
  """The official ImageNet-1K recipe for one variant; arg 'smoke' gives the smoke run."""
  config = base_config()
  config.dataset = 'imagenet2012'
  config.model.name = model_name
  config.model.drop_path_rate = drop_path_rate
  config.model.overrides.update(TRAINING_NUMERICS)
  config.log_every_steps = 100
  config.eval_every_steps = -1  # once per epoch, as the official recipe
  config.checkpoint_every_steps = 2000
  return apply_arg(config, arg)


def apply_arg(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """The config argument (`file.py:arg`): '' keeps the config, 'smoke' makes it a smoke run."""
  if arg == 'smoke':
    return smoke(config)
  if arg:
    raise ValueError(f"Unknown config argument {arg!r}: use 'smoke' or nothing.")
  return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A tiny model, a few steps, one eval and one checkpoint: the whole path in < 60 s on a CPU.

  The recipe (optimizer, augmentation) stays the config's own, so its code paths run too.
  """
  config.dataset = 'synthetic_objects/smoke'
  config.input.image_size = 64
  config.input.shuffle_buffer = 512
  config.input.cache = True
  config.model.overrides.update(SMOKE_MODEL)
  config.global_batch_size = 32   # a multiple of 8: also runs on 8 (fake) devices
  config.eval_batch_size = 64
  config.num_train_steps = 12
  config.warmup_epochs = 0.25     # 4 steps of the 16 an epoch of 512 examples has
  config.optimizer.ema_decay = 0.9
  config.log_every_steps = 4
  config.eval_every_steps = 0     # once, at the end
  config.checkpoint_every_steps = 12
  return config
