"""What a training config may contain, and the checks that run before anything compiles.

`base_config()` is the schema: every field the trainer and the input pipeline read, with its
default (the official ImageNet-1K recipe, docs/recipe.md) and its meaning. It is the only place a
default lives: the data and training code read the fields, with no fallbacks of their own.
Experiment configs start from it and change what differs. `validate_config` rejects unknown or
missing fields and bad values with a message that names the field and the fix;
`check_against_devices` does the same for the batch sizes and the mesh once the device count is
known.
"""
import dataclasses
import difflib
import math
import typing

import ml_collections
from ml_collections import config_dict

from sparseformer_jax import NORMALIZATION, SparseFormerConfig
from sparseformer_jax.models.config import IMAGENET_MEAN, IMAGENET_STD


class ConfigError(ValueError):
  """A config field has a value the trainer cannot use; the message names the field and the fix."""


AUGMENT_MODES = ('inception', 'light', 'none')  # config.input.augment

# Model fields that the trainer sets from other config fields.
_MODEL_FIELDS_SET_BY_TRAINER = ('num_classes', 'drop_path_rate', 'dtype')


def model_overrides() -> ml_collections.ConfigDict:
  """Every SparseFormerConfig field as a typed placeholder, so --config.model.overrides.X works.

  None leaves the variant's value; see sparseformer_jax/models/config.py for their meaning.
  """
  hints = typing.get_type_hints(SparseFormerConfig)
  overrides = ml_collections.ConfigDict()
  for field in dataclasses.fields(SparseFormerConfig):
    if field.name in _MODEL_FIELDS_SET_BY_TRAINER:
      continue
    kind = hints[field.name]
    if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X
      kind = next(a for a in typing.get_args(kind) if a is not type(None))
    kind = typing.get_origin(kind) or kind  # Tuple[str, ...] -> tuple
    overrides[field.name] = config_dict.placeholder(kind)
  return overrides


def base_config() -> ml_collections.ConfigDict:
  """Every known field with its default (the official recipe: SF-T on ImageNet-1K)."""
  c = ml_collections.ConfigDict()
  c.task = 'classification'           # 'classification' (labels) | 'bootstrap' (match a ViT
                                      # teacher without labels: configs/bootstrap.py)
  c.seed = 0                          # model init, dropout (fold_in(key, step)) and data order
  c.dataset = 'imagenet2012'          # a TFDS name, e.g. 'synthetic_objects/smoke'
  c.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None: the TFDS default
  c.image_key = 'image'
  c.label_key = 'label'
  c.train_split = 'train'
  c.eval_split = 'validation'         # evaluated whole, exactly, on any number of hosts

  c.input = ml_collections.ConfigDict()
  c.input.image_size = 224            # train crop and eval crop side, pixels
  c.input.crop_pct = 0.875            # eval: short side to floor(image_size / crop_pct), then
                                      # the centre crop (224: 256 -> 224)
  c.input.mean = IMAGENET_MEAN        # normalization, 0..1 units
  c.input.std = IMAGENET_STD
  c.input.scale = (0.08, 1.0)         # random-resized crop area range ('inception', 'light')
  c.input.ratio = (3 / 4, 4 / 3)      # random-resized crop aspect range
  c.input.hflip = 0.5                 # horizontal flip probability
  c.input.augment = 'inception'       # 'inception' (crop, flip, colour, erasing) | 'light' (crop,
                                      # flip) | 'none' (the eval transform)
  c.input.randaugment = 'rand-m9-mstd0.5-inc1'  # timm spec, '' = off ('inception' only)
  c.input.color_jitter = 0.4          # used only when randaugment is '' ('inception' only)
  c.input.reprob = 0.25               # random erasing probability, per-pixel noise ('inception')
  c.input.mixup = 0.8                 # mixup alpha, 0 = off (mixing acts in every augment mode)
  c.input.cutmix = 1.0                # cutmix alpha, 0 = off
  c.input.mixup_prob = 1.0            # probability that a group is mixed at all
  c.input.mixup_switch_prob = 0.5     # probability of cutmix instead of mixup
  c.input.mixup_group_size = 128      # a host's batch of B mixes as max(B // this, 1) groups,
                                      # each with its own draw (the official per-GPU batch)
  c.input.label_smoothing = 0.1       # targets are smoothed soft labels
  c.input.repeated_aug = 3            # repeated augmentation count, 1 = off
  c.input.shuffle_buffer = 50_000     # records in the train shuffle buffer
  c.input.prefetch = 2                # batches prefetched on the host
  c.input.cache = False               # cache decoded examples in memory (small datasets)
  c.input.num_frames = 0              # > 0: video clips of this many frames (video models)
  c.input.temporal_stride = 1         # video: frames between consecutive clip frames
  c.input.eval_views = 1              # video: clips per eval video, their logits averaged

  c.model = ml_collections.ConfigDict()
  c.model.name = 'sparseformer_v1_tiny'  # see sparseformer_jax.create_model
  c.model.drop_path_rate = 0.2
  c.model.overrides = model_overrides()  # create_model fields; None: the variant's value
  c.dtype = 'float32'                 # compute dtype: 'float32' | 'bfloat16' (params stay f32)

  c.global_batch_size = 1024          # over all devices and hosts
  c.eval_batch_size = 1024            # over all devices and hosts
  c.sub_batches = 1                   # each device's (micro-)batch runs as this many interleaved
                                      # sub-batches in one program, same results: XLA:CPU
                                      # overlaps them (~+10% on 2 cores); 1 on GPU/TPU
  c.cpu_workarounds = True            # on the CPU, trace the ops' XLA:CPU versions (faster, same
                                      # results; sparseformer_jax/ops); False: the plain ops, as
                                      # GPU/TPU always run (A/B runs, debugging)
  c.num_epochs = 300.0                # training length, unless num_train_steps > 0
  c.num_train_steps = -1              # > 0: overrides num_epochs
  c.warmup_epochs = 20.0              # linear warm-up length (converted to steps)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.base_lr = 5e-4          # peak lr per lr_base_batch_size examples
  c.optimizer.warmup_lr = 5e-7        # warm-up start lr, scaled like base_lr
  c.optimizer.min_lr = 5e-6           # cosine end lr, scaled like base_lr
  c.optimizer.lr_base_batch_size = 512  # lr = base_lr * global_batch_size / this
  c.optimizer.weight_decay = 0.05     # AdamW, not on params with ndim <= 1 nor initial_roi
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 5.0    # global-norm clip, 0 = off
  c.optimizer.ema_decay = 0.9999      # EMA of the params, evaluated beside the raw params
  c.optimizer.accum_steps = 1         # micro-batches per step (gradient accumulation)
  c.optimizer.layer_decay = 1.0       # fine-tuning: lr x layer_decay**k for the k-th unit below
                                      # the head (stem, initial embeddings/RoIs last); 1 = off
  c.optimizer.frozen = ''             # comma-separated globs of param paths that do not train
                                      # (e.g. 'stem,focusing', 'cortex/unit_[01]'); they keep no
                                      # optimizer state
  c.optimizer.linear_probe = False    # train the head only (everything else frozen)

  c.log_every_steps = 100             # train/* scalars and progress
  c.eval_every_steps = -1             # -1: once per epoch; 0: only at the end (always at the end)
  c.checkpoint_every_steps = 1000     # 0: only at the end; always at the end and on SIGTERM
  c.keep_checkpoints = 3              # the newest N are kept
  c.init_from = ''                    # weights to start from (a workdir, a checkpoints dir or a
                                      # step dir, e.g. scripts/convert_checkpoint.py --out); resume
                                      # from the workdir itself needs no flag
  c.init_skip = ''                    # comma-separated param paths NOT taken from init_from
                                      # (e.g. 'head': fine-tuning to other classes); they keep
                                      # their fresh initialization
  c.init_inflate_replicates = 0       # > 0: init_from holds IMAGE weights, inflated into this
                                      # video model with that many token replicas
                                      # (docs/model.md §7)
  c.eval_only = False                 # evaluate the workdir's latest checkpoint (else init_from)
  c.nan_policy = 'raise'              # non-finite loss/grad: 'raise' (stop) | 'skip' (count it)
  c.nan_skip_limit = 10               # 'skip': this many non-finite steps in a row stop the run
                                      # (the model diverged; its updates are no longer applied)
  c.roi_images = 4                    # eval draws the tokens' RoIs on this many validation
                                      # images into TensorBoard (image models; 0 = off)

  c.bootstrap = ml_collections.ConfigDict()  # task='bootstrap' (CVPR 2024): configs/bootstrap.py
  c.bootstrap.teacher = ''            # the pretrained ViT: a vision_transformer / big_vision .npz,
                                      # or a timm / OpenCLIP PyTorch state dict
  c.bootstrap.teacher_activation = 'gelu'  # 'gelu' | 'quick_gelu' (OpenAI CLIP): not in the file
  c.bootstrap.teacher_num_heads = 0   # PyTorch layouts do not record it; 0: width // 64
  c.bootstrap.first_frozen_block = -1  # teacher blocks from this one on stay frozen (with the
                                      # final norm and head); -1: 2/3 of its depth (the paper)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                    # data-parallel axis size, -1: all devices / fsdp
  c.mesh.fsdp = 1                     # axis that also shards params and optimizer state

  c.profile = ml_collections.ConfigDict()
  c.profile.first_step = -1           # first profiled step, -1 = no profile
  c.profile.num_steps = 5
  return c


_CHOICES = {
    'dtype': ('float32', 'bfloat16'),
    'nan_policy': ('raise', 'skip'),
    'input.augment': AUGMENT_MODES,
    'task': ('classification', 'bootstrap'),
    'bootstrap.teacher_activation': ('gelu', 'quick_gelu'),
}
_POSITIVE = ('global_batch_size', 'eval_batch_size', 'sub_batches', 'log_every_steps', 'keep_checkpoints',
             'optimizer.accum_steps', 'optimizer.lr_base_batch_size', 'input.image_size',
             'profile.num_steps', 'input.temporal_stride', 'input.eval_views',
             'input.mixup_group_size', 'optimizer.base_lr', 'input.shuffle_buffer',
             'nan_skip_limit')
_NON_NEGATIVE = ('checkpoint_every_steps', 'warmup_epochs',
                 'optimizer.warmup_lr', 'optimizer.min_lr', 'optimizer.weight_decay',
                 'optimizer.grad_clip_norm', 'model.drop_path_rate', 'input.num_frames',
                 'init_inflate_replicates', 'roi_images', 'input.prefetch')


def _get(config, dotted):
  for part in dotted.split('.'):
    config = config[part]
  return config


def unknown_field_message(dotted: str) -> str:
  """'optimizer.lr' -> 'config.optimizer.lr is not a known field. Did you mean ...base_lr? ...'."""
  schema, prefix = base_config(), ''
  for key in dotted.split('.'):
    if isinstance(schema, ml_collections.ConfigDict) and key in schema:
      schema, prefix = schema[key], prefix + key + '.'
      continue
    known = list(schema.keys()) if isinstance(schema, ml_collections.ConfigDict) else []
    close = (difflib.get_close_matches(key, known, n=1)
             or [k for k in known if key in k or k in key][:1])
    hint = f' Did you mean {prefix}{close[0]}?' if close else ''
    return (f'config.{prefix}{key} is not a known field.{hint} The known fields are listed, with '
            'their meaning, in sparseformer_jax/trainer/config_schema.py:base_config().')
  return f'config.{dotted} cannot be set that way.'


def _check_fields(config, schema, prefix=''):
  """Unknown and missing fields, recursively."""
  for key in config.keys():
    name = prefix + key
    if key not in schema:
      raise ConfigError(unknown_field_message(name))
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ConfigError(f'config.{name} must be a ConfigDict of fields, got {config[key]!r}.')
      _check_fields(config[key], schema[key], name + '.')
  if prefix == 'model.overrides.':
    return  # A config may name only the model fields it overrides.
  for key in schema.keys():
    if key not in config:
      raise ConfigError(
          f'config.{prefix}{key} is missing. Build configs from '
          f'sparseformer_jax.trainer.config_schema.base_config() (its default is '
          f'{schema[key]!r}).')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Field names and values, independent of devices. Raises ConfigError naming the fix."""
  _check_fields(config, base_config())
  for name, choices in _CHOICES.items():
    if _get(config, name) not in choices:
      raise ConfigError(f'config.{name}={_get(config, name)!r} is not one of {choices}.')
  for name in _POSITIVE:
    if not _get(config, name) > 0:
      raise ConfigError(f'config.{name}={_get(config, name)!r} must be > 0.')
  for name in _NON_NEGATIVE:
    if not _get(config, name) >= 0:
      raise ConfigError(f'config.{name}={_get(config, name)!r} must be >= 0.')
  if config.num_train_steps <= 0 and not config.num_epochs > 0:
    raise ConfigError('The run has no length: set config.num_epochs > 0 or '
                      'config.num_train_steps > 0.')
  if not 0.0 <= config.optimizer.ema_decay < 1.0:
    raise ConfigError(f'config.optimizer.ema_decay={config.optimizer.ema_decay} must be in '
                      '[0, 1).')
  if not 0.0 < config.optimizer.layer_decay <= 1.0:
    raise ConfigError(f'config.optimizer.layer_decay={config.optimizer.layer_decay} must be in '
                      '(0, 1]: the lr of a unit is the next one\'s times it (1 = off).')
  if config.init_inflate_replicates and not config.init_from:
    raise ConfigError('config.init_inflate_replicates inflates the image weights of '
                      'config.init_from, which is empty: set it, or set the replicas to 0.')
  if config.init_skip and not config.init_from:
    raise ConfigError('config.init_skip names params not to take from config.init_from, which is '
                      'empty: set init_from, or clear init_skip.')
  if config.init_skip and config.eval_only:
    raise ConfigError('config.init_skip leaves params freshly initialized, which an eval-only run '
                      'would evaluate: clear init_skip, or set eval_only=False to fine-tune.')
  if config.task == 'bootstrap' and not config.bootstrap.teacher:
    raise ConfigError("config.task='bootstrap' needs a teacher: set config.bootstrap.teacher to a "
                      'ViT checkpoint (.npz, or a timm / OpenCLIP .pth).')
  if config.task == 'bootstrap' and (config.init_from or config.input.num_frames):
    raise ConfigError("config.task='bootstrap' starts from the teacher's weights, on images: "
                      'clear config.init_from and config.input.num_frames.')
  if config.eval_every_steps < -1:
    raise ConfigError('config.eval_every_steps must be -1 (every epoch), 0 (only at the end) '
                      f'or a step count, got {config.eval_every_steps}.')


def normalization_mismatch(config: ml_collections.ConfigDict):
  """A warning when weights from init_from were trained with another input normalization than
  config.input's (e.g. a CLIP-bootstrapped model fed ImageNet-normalized pixels), else None."""
  expected = NORMALIZATION.get(config.model.name)
  if not config.init_from or expected is None:
    return None
  given = (tuple(config.input.mean), tuple(config.input.std))
  if all(abs(a - b) < 1e-6 for got, want in zip(given, expected) for a, b in zip(got, want)):
    return None
  mean, std = (','.join(str(v) for v in values) for values in expected)
  return (f'{config.model.name} was trained on inputs normalized with mean {expected[0]} and std '
          f'{expected[1]}, but config.input has mean {given[0]} and std {given[1]}; fine-tuning '
          f"from its weights usually wants --config.input.mean='({mean})' "
          f"--config.input.std='({std})'.")


def check_against_devices(config, *, device_count: int) -> None:
  """Batch sizes and mesh axes must split evenly over all devices (of all hosts)."""
  mesh = config.mesh
  if mesh.fsdp < 1 or device_count % mesh.fsdp:
    raise ConfigError(f'config.mesh.fsdp={mesh.fsdp} must divide the {device_count} devices.')
  if mesh.data != -1 and mesh.data * mesh.fsdp != device_count:
    raise ConfigError(
        f'config.mesh.data * config.mesh.fsdp = {mesh.data} * {mesh.fsdp} must equal the '
        f'{device_count} devices; set config.mesh.data=-1 to use all of them.')
  accum, sub = config.optimizer.accum_steps, config.sub_batches
  for name, splits in (('global_batch_size', ((accum, 'micro-batches'), (sub, 'sub-batches'))),
                       ('eval_batch_size', ((sub, 'sub-batches'),))):
    size = _get(config, name)
    unit = device_count * math.prod(n for n, _ in splits)
    if size % unit:
      per = ' x '.join([f'{device_count} devices'] + [f'{n} {what}' for n, what in splits
                                                      if n > 1])
      raise ConfigError(
          f'config.{name}={size} is not divisible by the {per}: set --config.{name} to a '
          f'multiple of {unit}, e.g. {-(-size // unit) * unit}.')
