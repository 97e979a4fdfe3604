"""Bootstrapping a SparseFormer from a pretrained ViT without labels (Gao et al., CVPR 2024,
"Bootstrapping SparseFormers from Vision Foundation Models", arXiv 2312.01987).

  python main.py --workdir=workdirs/btsp_augreg_base \
      --config=configs/bootstrap.py:teacher=ViT-B_16.npz,model=sparseformer_btsp_augreg_base
  python main.py --workdir=workdirs/btsp_demo \
      --config=configs/bootstrap.py:teacher=DIR/teacher.npz,dataset=synthetic_objects
      # the CPU demo (scripts/bootstrap_demo.py makes the teacher)
  python main.py --config=configs/bootstrap.py:teacher=T.npz,smoke --workdir=/tmp/btsp  # < 60 s

Arguments (comma-separated): teacher=SOURCE (a vision_transformer / big_vision .npz, or a timm /
OpenCLIP PyTorch state dict), model=NAME (a bootstrapped variant, sparseformer_btsp_*; default
sparseformer_btsp_augreg_base), dataset=D (default imagenet2012; synthetic_objects: the embedded
demo recipe), smoke (a 12-step run of a tiny student on SMOKE_TEACHER's shape).

What follows the paper (abstract; Fig. 2 and its caption):
- The student's cortex is the teacher's transformer: the plain ViT units take the teacher's last
  2N/3 blocks (an N-block teacher; blocks N/3.. of ViT-B/L: 8 of 12, 16 of 24, which is the
  cortex depth of the official sparseformer_btsp_* variants); its first N/3 blocks, patch and
  position embeddings are dropped, replaced by the focusing transformer and one sampling unit.
- Frozen "as much as possible": the blocks from 2N/3 on (config.bootstrap.first_frozen_block =
  -1), with the final norm and head; trained: the focusing transformer, the sampling unit, the
  transition, the stem and the inherited blocks N/3..2N/3-1 ("a few early pre-trained blocks").
- Latent tokens about 1/4 of the ViT's patch tokens (48 + CLS for 196 patches: the variants').
- The [CLS] token is inherited and gets no classification supervision; the objective aligns the
  final representation with the teacher's on unlabeled images (ImageNet-1K), labels unused.
- "A few hours": a short schedule (below).

Where the paper (as far as its abstract, figures and the official configs tell) is silent, we chose:
- The alignment loss: 1 - cosine similarity between the head outputs (the teacher's classifier
  logits for AugReg, the CLIP projection's embedding for CLIP): the head is inherited and frozen,
  so both models emit the same space, which keeps CLIP students zero-shot capable, makes top-1
  with the teacher's head the natural check, and is scale-free (no temperature to tune).
- The student's CLS embedding starts at the teacher's CLS plus the position row the teacher adds
  to it (the student adds none); it is trained, as it enters the first (trainable) ViT unit in
  place of the dropped blocks' output.
- Schedule: 10 epochs, 1 warm-up, AdamW lr 2e-4 per 512 images (cosine to 1e-6), weight decay
  0.05, grad clip 5, batch 1024: a fine-tuning lr for the inherited blocks that is still enough
  for the fresh focusing transformer; EMA 0.9998 (evaluated beside the raw params).
- Augmentation: random-resized crop (scale 0.35-1) + flip only; no RandAugment, mixing, erasing
  or label smoothing: the target is the teacher on the very same image, so augmentation only
  adds variety, and strong distortions would move both away from the teacher's training data.
- Input: the teacher's resolution (224; pass --config.input.image_size=384 for a /16-384 teacher:
  the trainer says so) and normalization (the variant's: 0.5/0.5 for AugReg, CLIP's mean/std).
- LayerNorm eps: the variants' 1e-5 everywhere (AugReg teachers use 1e-6; the official
  bootstrapped variants keep 1e-5, and the difference is far below the alignment error).
"""
from configs import common
from sparseformer_jax import NORMALIZATION
from sparseformer_jax.trainer.config_schema import base_config

# ViT shapes (baselines/vit.py fields) of the embedded demo's teacher and of the smoke teacher;
# scripts/bootstrap_demo.py and the tests build their teachers from these.
DEMO_TEACHER = dict(patch=8, width=128, depth=6, num_heads=2, mlp_ratio=4)
SMOKE_TEACHER = dict(patch=16, width=64, depth=3, num_heads=1, mlp_ratio=4)

# Students fitting them: width and heads of the teacher, 1 + 2N/3 cortex units, tokens ~1/4 of
# the teacher's patches (64 and 16) including the CLS token.
DEMO_STUDENT = dict(conv_dim=32, num_tokens=15, num_points=16, focusing_width=64,
                    cortex_width=128, cortex_depth=5, generator_hidden=32)
SMOKE_STUDENT = dict(conv_dim=16, num_tokens=3, num_points=4, focusing_width=32,
                     focusing_repeats=2, cortex_width=64, cortex_depth=3, generator_hidden=16,
                     num_heads=None)


def _parse(arg: str) -> dict:
  args = {}
  for item in filter(None, arg.split(',')):
    key, sep, value = item.partition('=')
    if key not in ('teacher', 'model', 'dataset', 'smoke') or (key == 'smoke') == bool(sep):
      raise ValueError(f'configs/bootstrap.py argument {item!r}: expected teacher=SOURCE, '
                       'model=NAME, dataset=D or smoke, comma-separated.')
    args[key] = value if sep else True
  if 'teacher' not in args:
    raise ValueError('configs/bootstrap.py needs teacher=SOURCE (a ViT .npz / .pth), e.g. '
                     '--config=configs/bootstrap.py:teacher=ViT-B_16.npz,model='
                     'sparseformer_btsp_augreg_base')
  return args


def get_config(arg: str = ''):
  args = _parse(arg)
  config = base_config()
  config.task = 'bootstrap'
  config.bootstrap.teacher = args['teacher']
  config.dataset = args.get('dataset', 'imagenet2012')
  config.model.name = args.get('model', 'sparseformer_btsp_augreg_base')
  if config.model.name not in NORMALIZATION or 'btsp' not in config.model.name:
    raise ValueError(f'model={config.model.name!r}: bootstrap a sparseformer_btsp_* variant, '
                     f"one of {sorted(n for n in NORMALIZATION if 'btsp' in n)}.")
  config.bootstrap.teacher_activation = 'quick_gelu' if 'clip' in config.model.name else 'gelu'
  config.input.mean, config.input.std = NORMALIZATION[config.model.name]
  config.model.drop_path_rate = 0.0

  config.input.augment = 'light'
  config.input.scale = (0.35, 1.0)
  config.input.randaugment = ''
  config.input.color_jitter = 0.0
  config.input.reprob = 0.0
  config.input.mixup = 0.0
  config.input.cutmix = 0.0
  config.input.label_smoothing = 0.0
  config.input.repeated_aug = 1

  config.num_epochs = 10.0
  config.warmup_epochs = 1.0
  config.optimizer.base_lr = 2e-4
  config.optimizer.warmup_lr = 1e-6
  config.optimizer.min_lr = 1e-6
  config.optimizer.ema_decay = 0.9998
  config.checkpoint_every_steps = 2000
  config.roi_images = 0
  if config.dataset.startswith('synthetic_objects'):
    _embedded(config)
  if args.get('smoke'):
    common.smoke(config)
    config.model.overrides.update(SMOKE_STUDENT)
  return config


def _embedded(config):
  """The CPU demo on synthetic_objects (64 px) with a DEMO_TEACHER-shaped ViT."""
  config.input.image_size = 64
  config.input.scale = (0.5, 1.0)     # keep the target object in the crop
  config.input.cache = True
  config.input.shuffle_buffer = 20_000
  config.model.overrides.update(DEMO_STUDENT)
  config.global_batch_size = 64
  config.eval_batch_size = 200
  config.num_epochs = 2.0
  config.warmup_epochs = 0.2
  config.optimizer.lr_base_batch_size = 64
  config.optimizer.base_lr = 1e-3
  config.optimizer.min_lr = 1e-5
  config.optimizer.ema_decay = 0.99
  config.log_every_steps = 50
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 500
