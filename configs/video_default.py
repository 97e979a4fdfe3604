"""The embedded video default: a small video SparseFormer learns `synthetic_motion` on a CPU.

The task: in 8 frames of 32x32, a vivid disk moves among moving grey distractors; name the
direction it moves in (10 classes, 36 degrees apart). One frame says nothing about the label, so
the model has to follow the disk through time (3-D RoIs, docs/model.md §7). Flips and time
reversal would change the label, so there is no augmentation at all: every clip is seen whole,
as generated.
Expected: val/top1 >= 0.90 within 10 minutes on 2 CPU cores (measured: see MEASURED below).

  python main.py --config=configs/video_default.py --workdir=workdirs/video_default
  python main.py --config=configs/video_default.py:smoke --workdir=/tmp/video_smoke   # < 60 s
Running the same command again resumes from the workdir's latest checkpoint. The first run
generates synthetic_motion (15k / 1.5k clips, ~1-2 min, once) into the TFDS data dir.

MEASURED (469 steps of 64 clips = 2 epochs, 30k clips) on 2 CPU cores SHARED with other jobs,
so slower than an idle machine; training is deterministic, both runs gave the same numbers:
  val/top1 0.9987, ema_val/top1 0.996 (after epoch 1, step 235: val/top1 0.90, ema 0.38).
  load 3.7-7.4: 85 img/s on average (56-94), 7.7 min wall for the command;
  load 5.0-9.1: 55 img/s on average (46-69), 11.2 min wall for the command.
"""
import ml_collections

from configs import common
from sparseformer_jax.trainer.config_schema import base_config


def get_config(arg: str = ''):
  config = base_config()
  config.dataset = 'synthetic_motion'
  config.image_key = 'video'
  config.input.num_frames = 8         # all 8 frames of a clip ...
  config.input.temporal_stride = 1    # ... consecutive
  config.input.eval_views = 1         # the one (whole) clip
  config.input.image_size = 32        # the clips' frame size
  config.input.crop_pct = 1.0         # no centre crop: the disk may be anywhere, borders too
  config.input.augment = 'none'       # train clips = eval clips: no crop, flip or colour change
  config.input.hflip = 0.0            # a flip mirrors the direction: it would change the label
  config.input.randaugment = ''
  config.input.color_jitter = 0.0
  config.input.reprob = 0.0
  config.input.mixup = 0.0
  config.input.cutmix = 0.0
  config.input.label_smoothing = 0.1
  config.input.repeated_aug = 1
  config.input.cache = True           # decoded clips: 15k x 24 KB = 0.4 GB
  config.input.shuffle_buffer = 15_000  # the whole train split

  config.model.name = 'sparseformer_v1_tiny'
  config.model.drop_path_rate = 0.0
  config.model.overrides = ml_collections.ConfigDict(dict(
      video=True, replicates=1,
      conv_dim=32, num_tokens=16, num_points=16, focusing_width=64, focusing_repeats=4,
      cortex_width=128, cortex_depth=2, num_heads=4))

  config.global_batch_size = 64
  config.eval_batch_size = 250
  config.num_epochs = 2.0
  config.warmup_epochs = 0.2
  config.optimizer.lr_base_batch_size = 64
  config.optimizer.base_lr = 2e-3
  config.optimizer.warmup_lr = 1e-5
  config.optimizer.min_lr = 1e-5
  config.optimizer.ema_decay = 0.99   # a ~100-step average: short enough for a ~500-step run
  config.log_every_steps = 50
  config.eval_every_steps = 235       # ~once per epoch (234.4 steps): at 235 and at the end, 469
  config.checkpoint_every_steps = 250
  config = common.apply_arg(config, arg)
  if arg == 'smoke':
    config.dataset = 'synthetic_motion/smoke'
    config.input.image_size = 32      # common.smoke's is the image default's 64
  return config
