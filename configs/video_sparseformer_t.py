"""Video SparseFormer-T on Kinetics-400: sparseformer_v1_tiny with video=True, from image weights.

The model is the image SparseFormer-T with 3-D RoIs (docs/model.md §7) and replicates=2: every
latent token exists twice, one replica per half of the clip. Clips: 8 frames 8 apart (T x stride =
8 x 8: a 57-frame window, 2.3 s of 25 fps video, as SlowFast 8x8 samples Kinetics), 224 px.
Train: a random window, one inception crop / flip / RandAugment / erasing for all 8 frames,
Mixup / CutMix over whole clips. Eval: the centred window, resize 256 -> centre crop 224
(input.eval_views = V > 1 gives V evenly spaced windows per video, whose logits the trainer
averages). The recipe below (30 epochs, lr, MViTv2's RandAugment m7-n4) is a starting point for
fine-tuning from ImageNet weights, not a reproduced paper number: no expected top-1 yet.

Starting weights (the official MediaSparseFormer starts from image weights): an ImageNet
SparseFormer-T run's workdir (configs/sparseformer_t.py), its checkpoints dir or a step dir (e.g.
from scripts/convert_checkpoint.py --out). `config.init_from` names it and
`config.init_inflate_replicates = 2` says these are IMAGE weights that the trainer inflates with
sparseformer_jax.weights.inflate.inflate_from_image(params, 2) (tokens copied replica-major, zero
time components) before fitting them to this video model; 0 would mean init_from already holds
weights of this video model. Resuming from this run's own workdir needs neither.

The data: TFDS has no Kinetics builder, so Kinetics-400 is made a TFDS dataset once:
  1. Download the videos (e.g. the CVDF `kinetics-dataset` tarballs) and lay them out as
     MANUAL_DIR/{train,val}/<class name>/<clip id>.mp4 (400 class folders each).
  2. Write a small tfds.core.GeneratorBasedBuilder named `kinetics400`, the video analogue of
     tfds.folder_dataset.ImageFolder: features {'video': tfds.features.Video(shape=(None, None,
     None, 3), encoding_format='jpeg', ffmpeg_extra_args=('-r', '25', '-vf', 'scale=-2:256')),
     'label': tfds.features.ClassLabel(names=<the sorted class folder names>)}; splits 'train'
     (from train/) and 'validation' (from val/), each example (clip id, {'video': the .mp4 path,
     'label': its folder name}); MANUAL_DOWNLOAD_INSTRUCTIONS saying where the files go. The Video
     feature runs ffmpeg on each file (25 fps, short side 256) and stores the frames as JPEGs; this
     pipeline later decodes only the 8 frames of each sampled clip. Leave out the few files
     ffprobe cannot read.
  3. Put that module into sparseformer_jax/data/ (its builders register on import) and build it
     once, with ffmpeg installed, into the data dir every host reads:
       python scripts/prepare_data.py --dataset kinetics400 --manual_dir MANUAL_DIR \
         --data_dir gs://$BUCKET/tensorflow_datasets
     Training needs only that data dir: TFDS reads a prepared dataset without its builder code.
  Any TFDS video dataset with a Video (or uint8 Tensor (T, H, W, 3)) feature and a ClassLabel
  works the same way, e.g. --config.dataset=ucf101 (prepared by TFDS itself).

Cloud TPU VM pod slice (runs on every host):
  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd sparseformer-jax && \
    python main.py --config=configs/video_sparseformer_t.py --workdir=gs://$BUCKET/video_sf_t \
    --config.data_dir=gs://$BUCKET/tensorflow_datasets --config.init_from=gs://$BUCKET/sf_t"
GPU machine (8 GPUs, bfloat16 compute):
  python main.py --config=configs/video_sparseformer_t.py --workdir=workdirs/video_sf_t \
    --config.dtype=bfloat16 --config.init_from=workdirs/sf_t
Smoke run (tiny video model from scratch on synthetic_motion's 8-frame 32 px clips):
  python main.py --config=configs/video_sparseformer_t.py:smoke --workdir=/tmp/video_sf_t_smoke
Running the same command again resumes from the workdir's latest checkpoint.
"""
import ml_collections

from configs import common
from sparseformer_jax.trainer.config_schema import base_config

REPLICATES = 2  # token replicas of the video model (docs/model.md §7), also the inflation factor


def get_config(arg: str = ''):
  config = base_config()
  config.dataset = 'kinetics400'      # built as the docstring says
  config.image_key = 'video'
  config.input.num_frames = 8         # T
  config.input.temporal_stride = 8   # frames between clip frames
  config.input.eval_views = 1         # centred clip only
  config.input.image_size = 224
  config.input.randaugment = 'rand-m7-n4-mstd0.5-inc1'
  config.input.repeated_aug = 1
  config.input.shuffle_buffer = 1024  # encoded videos, a few MB each
  config.input.cache = False

  config.model.name = 'sparseformer_v1_tiny'
  config.model.drop_path_rate = 0.2
  config.model.overrides = ml_collections.ConfigDict(dict(video=True, replicates=REPLICATES))
  config.init_from = ''               # the image run, on the command line (see above)
  config.init_inflate_replicates = REPLICATES

  config.global_batch_size = 256
  config.eval_batch_size = 256
  config.num_epochs = 30.0
  config.warmup_epochs = 2.5
  config.optimizer.base_lr = 2.5e-4   # per 512 clips: 1.25e-4 at batch 256
  config.log_every_steps = 100
  config.eval_every_steps = -1        # once per epoch
  config.checkpoint_every_steps = 1000
  config = common.apply_arg(config, arg)
  if arg == 'smoke':
    _smoke_video(config)
  return config


def _smoke_video(config: ml_collections.ConfigDict) -> None:
  """Turns common.smoke's image run into a video one on synthetic_motion/smoke, from scratch."""
  config.dataset = 'synthetic_motion/smoke'
  config.input.image_size = 32        # the clips' frame size
  config.input.temporal_stride = 1    # 8 of its 8 frames
  config.model.overrides.update(video=True, replicates=REPLICATES)
  config.init_inflate_replicates = 0  # no image weights to start from
