"""Fine-tunes pretrained weights on a prepared dataset, e.g. a folder of your own images.

  python scripts/prepare_data.py --folder ~/photos --dataset my_photos --data_dir ~/tfds
  python main.py --config=configs/finetune.py:dataset=my_photos,init=SOURCE \
      --config.data_dir=~/tfds --workdir=workdirs/my_photos

SOURCE is
  - a training workdir of this project (or its checkpoints / a step directory): the model, its
    overrides, the input normalization and the resolution are taken from its config.json;
  - a directory written by scripts/convert_checkpoint.py: add `,model=NAME` (the variant);
  - a variant name, e.g. sparseformer_v1_tiny: its official weights.
num_classes comes from the dataset; the head is new (init_skip='head'), everything else starts
from SOURCE. The recipe: a short schedule (10 epochs, 1 of warm-up), light augmentation (random
resized crop + flip, no mixing), layer-wise lr decay 0.75, EMA 0.99. Any field can be changed
with --config.X=..., e.g. --config.optimizer.linear_probe=True (train only the head),
--config.optimizer.frozen=stem,focusing, --config.input.image_size=160 (the resolution).
Every field is documented in sparseformer_jax/trainer/config_schema.py:base_config().
"""
import json
import os

from sparseformer_jax import NORMALIZATION, VARIANTS
from sparseformer_jax.trainer.config_schema import base_config

_ARGS = ('dataset', 'init', 'model')


def parse_arg(arg: str) -> dict:
  """'dataset=NAME,init=SOURCE[,model=NAME]' -> {'dataset': ..., 'init': ..., 'model': ...}."""
  values = {}
  for item in filter(None, arg.split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in _ARGS:
      raise ValueError(f'configs/finetune.py:{arg}: expected dataset=NAME,init=SOURCE'
                       f'[,model=NAME], got {item!r}.')
    values[key] = value
  missing = [k for k in ('dataset', 'init') if not values.get(k)]
  if missing:
    raise ValueError(f'configs/finetune.py:{arg} lacks {" and ".join(missing)}: use '
                     'configs/finetune.py:dataset=NAME,init=SOURCE[,model=NAME].')
  return values


def _source_config(init: str):
  """The config.json of the training workdir that holds `init` (itself, or 1-2 levels up)."""
  path = os.path.abspath(os.path.expanduser(init))
  for directory in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    if os.path.isfile(os.path.join(directory, 'config.json')):
      with open(os.path.join(directory, 'config.json')) as f:
        return json.load(f)
  return None


def get_config(arg: str = ''):
  args = parse_arg(arg)
  config = base_config()
  config.dataset = args['dataset']
  config.init_from = args['init']
  config.init_skip = 'head'           # a new head for the dataset's classes

  source = None if args['init'] in VARIANTS else _source_config(args['init'])
  model = args.get('model') or (args['init'] if args['init'] in VARIANTS else None)
  if source is not None and model in (None, source['model']['name']):
    config.model.name = source['model']['name']
    config.model.overrides.update({k: tuple(v) if isinstance(v, list) else v
                                   for k, v in source['model']['overrides'].items()
                                   if v is not None})  # JSON has lists for tuples
    config.input.mean = tuple(source['input']['mean'])
    config.input.std = tuple(source['input']['std'])
    config.input.image_size = source['input']['image_size']
  elif model is not None:
    config.model.name = model
    if model in NORMALIZATION:
      config.input.mean, config.input.std = NORMALIZATION[model]
  else:
    raise ValueError(f'configs/finetune.py: init={args["init"]} is neither a training workdir '
                     '(no config.json) nor a variant name; add model=NAME (the variant its '
                     'weights are of).')

  config.model.drop_path_rate = 0.1
  config.input.augment = 'light'      # random-resized crop + flip
  config.input.scale = (0.35, 1.0)
  config.input.mixup = 0.0
  config.input.cutmix = 0.0
  config.input.label_smoothing = 0.1
  config.input.repeated_aug = 1
  config.input.shuffle_buffer = 10_000

  config.global_batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = 10.0
  config.warmup_epochs = 1.0
  config.optimizer.base_lr = 1e-3     # per 512 images: 1.25e-4 at batch 64 (the head's lr)
  config.optimizer.warmup_lr = 1e-6
  config.optimizer.min_lr = 1e-6
  config.optimizer.layer_decay = 0.75
  config.optimizer.ema_decay = 0.99
  config.log_every_steps = 20
  config.eval_every_steps = -1        # once per epoch
  config.checkpoint_every_steps = 500
  return config
