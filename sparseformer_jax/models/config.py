"""Model hyper-parameters (`SparseFormerConfig`) and the official named variants.

One frozen dataclass describes every official SparseFormer: v1 (ICLR 2024) in both numerics
flavors, the bootstrapped/CLIP variants (CVPR 2024) and the video model. `create_model` builds a
linen module from a variant name plus field overrides.
"""
import ast
import dataclasses
from typing import Optional, Tuple

OPS = ("attn", "roi_adjust", "sampling", "mlp", "pe_inject")
V1_LEADING_OPS = ("attn", "roi_adjust", "sampling", "mlp")
BTSP_FOCUSING_OPS = ("sampling", "pe_inject", "attn", "mlp", "roi_adjust")
BTSP_LEADING_OPS = ("sampling", "pe_inject")
PLAIN_OPS = ("attn", "mlp")

# Numerics that differ between the two official code bases (docs/model.md §1, §3).
FLAVORS = {
    # imagenet/models/sparseformer.py (release v1.0.0)
    "imagenet": dict(stem_unbiased_var=True, stem_eps=1e-7, offset_eps=1e-7,
                     generator_ln_eps=None, min_mixing_out_points=0, zero_offset_init=False),
    # sparseformer/ library (release v2.0.0-refactor)
    "library": dict(stem_unbiased_var=False, stem_eps=1e-5, offset_eps=1e-5,
                    generator_ln_eps=1e-5, min_mixing_out_points=32, zero_offset_init=True),
}

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class SparseFormerConfig:
  """Everything that defines a SparseFormer's structure and numerics."""
  num_classes: int = 1000          # output size of the head projection
  conv_dim: int = 96               # channels of the early-convolution feature map
  num_tokens: int = 49             # latent tokens (per replica, for video)
  num_points: int = 36             # sampling points per token
  shared_initial_embedding: bool = False  # one (1, width) embedding for all tokens (btsp)
  focusing_width: int = 256
  focusing_repeats: int = 4        # the focusing unit is applied this often, weights shared
  cortex_width: int = 512
  cortex_depth: int = 8            # cortex units; the first one runs `cortex_leading_ops`
  focusing_ops: Tuple[str, ...] = V1_LEADING_OPS
  cortex_leading_ops: Tuple[str, ...] = V1_LEADING_OPS
  cortex_ops: Tuple[str, ...] = PLAIN_OPS
  mlp_ratio: int = 4
  num_heads: Optional[int] = 64    # v1 uses 64 heads whatever the width; None or 0: width // 64
  drop_path_rate: float = 0.2
  head: str = "avg"                # "avg": mean over tokens; "cls": the CLS token
  cls_insert_unit: int = -1        # unit index (0 = focusing) before which a CLS token is prepended
  head_bias: bool = True
  # Numerics (docs/model.md §1, §3, §6). The defaults are the official library's, in which the
  # released weights (and every video model) compute; the ImageNet training code's are
  # flavor="imagenet", grad_clamp=True (configs/common.py TRAINING_NUMERICS).
  flavor: str = "library"          # "imagenet" | "library": see FLAVORS
  ln_eps: float = 1e-6
  grad_clamp: bool = False         # clamp the sampling points' gradient to 1/H_feat (images only)
  padding: str = "zeros"           # "zeros" | "border": sampling outside the feature map
  mixing_bias: bool = True         # m_beta/s_beta and a GELU between the two mixing matmuls
  generator_hidden: Optional[int] = None  # hidden width of the mixing generator; None: width // 4
  transition_norm: bool = True     # LayerNorm after the focusing -> cortex Linear
  roi_adjust_mlp: bool = False     # btsp: LN -> Linear -> GELU -> Linear RoI adjust, no drop path
  stage_embedding: bool = False    # btsp: a learned (repeats, width) table added per repeat
  quick_gelu: bool = False         # CLIP: QuickGELU in the MLPs of units that do not repeat
  # Video (docs/model.md §7): RoIs (x1, y1, t1, x2, y2, t2) and `replicates` copies of every token.
  video: bool = False
  replicates: int = 1
  dtype: str = "float32"           # compute dtype; params are always float32

  @property
  def dims(self) -> int:
    """Coordinates per point: 2 (x, y) for images, 3 (x, y, t) for video."""
    return 3 if self.video else 2

  @property
  def total_tokens(self) -> int:
    return self.num_tokens * self.replicates

  def flavor_value(self, key):
    value = FLAVORS[self.flavor][key]
    return self.ln_eps if value is None else value

  def unit_specs(self):
    """(width, ops, repeats) of every unit in order: the focusing unit, then the cortex units."""
    specs = [(self.focusing_width, self.focusing_ops, self.focusing_repeats)]
    for k in range(self.cortex_depth):
      specs.append((self.cortex_width, self.cortex_leading_ops if k == 0 else self.cortex_ops, 1))
    return specs

  def validate(self):
    """Raises ValueError naming the field when the combination cannot be built."""
    if self.flavor not in FLAVORS:
      raise ValueError(f"flavor={self.flavor!r}: expected one of {sorted(FLAVORS)}.")
    if self.padding not in ("zeros", "border"):
      raise ValueError(f"padding={self.padding!r}: expected 'zeros' or 'border'.")
    if self.head not in ("avg", "cls"):
      raise ValueError(f"head={self.head!r}: expected 'avg' or 'cls'.")
    if self.head == "cls" and self.cls_insert_unit < 0:
      raise ValueError("head='cls' needs cls_insert_unit >= 0 (the unit before which the CLS "
                       "token is prepended).")
    for field in ("focusing_ops", "cortex_leading_ops", "cortex_ops"):
      unknown = set(getattr(self, field)) - set(OPS)
      if unknown:
        raise ValueError(f"{field} has unknown ops {sorted(unknown)}; known ops: {OPS}.")
    if self.cortex_depth < 1 or self.focusing_repeats < 1:
      raise ValueError("cortex_depth and focusing_repeats must be >= 1.")
    if self.replicates < 1 or (self.replicates > 1 and not self.video):
      raise ValueError(f"replicates={self.replicates}: token replicas need video=True and "
                       "replicates >= 1.")
    if self.cls_insert_unit >= 0:
      roi_units = [i for i, (_, ops, _) in enumerate(self.unit_specs())
                   if {"sampling", "roi_adjust", "pe_inject"} & set(ops)]
      if roi_units and self.cls_insert_unit <= max(roi_units):
        raise ValueError(f"cls_insert_unit={self.cls_insert_unit}: the CLS token has no RoI, so it "
                         f"must be inserted after the last unit that uses RoIs ({max(roi_units)}).")
    for width in (self.focusing_width, self.cortex_width):
      heads = self.heads(width)
      if width % heads:
        raise ValueError(f"width {width} is not divisible by its {heads} attention heads.")
    return self

  def heads(self, width: int) -> int:
    return min(self.num_heads, width) if self.num_heads else max(width // 64, 1)


_V1 = dict(conv_dim=96, num_points=36, focusing_repeats=4)
_BTSP = dict(
    conv_dim=64, num_tokens=48, num_points=16, shared_initial_embedding=True,
    focusing_ops=BTSP_FOCUSING_OPS, cortex_leading_ops=BTSP_LEADING_OPS, cortex_ops=PLAIN_OPS,
    num_heads=None, drop_path_rate=0.0, head="cls", cls_insert_unit=2, flavor="library",
    ln_eps=1e-5, grad_clamp=False, padding="border", mixing_bias=False, generator_hidden=128,
    transition_norm=False, roi_adjust_mlp=True, stage_embedding=True)

VARIANTS = {
    "sparseformer_v1_tiny": dict(_V1, num_tokens=49, focusing_width=256, cortex_width=512,
                                 cortex_depth=8, drop_path_rate=0.2),
    "sparseformer_v1_small": dict(_V1, num_tokens=64, focusing_width=320, cortex_width=640,
                                  cortex_depth=8, drop_path_rate=0.3),
    "sparseformer_v1_base": dict(_V1, num_tokens=81, focusing_width=384, cortex_width=768,
                                 cortex_depth=10, drop_path_rate=0.4),
    "sparseformer_btsp_augreg_base": dict(_BTSP, focusing_width=384, cortex_width=768,
                                          cortex_depth=9),
    "sparseformer_btsp_augreg_large": dict(_BTSP, focusing_width=512, cortex_width=1024,
                                           cortex_depth=17),
    "sparseformer_btsp_openai_clip_base": dict(_BTSP, focusing_width=384, cortex_width=768,
                                               cortex_depth=9, quick_gelu=True, num_classes=512,
                                               head_bias=False),
    "sparseformer_btsp_openai_clip_large": dict(_BTSP, num_tokens=63, focusing_width=512,
                                                cortex_width=1024, cortex_depth=17,
                                                quick_gelu=True, num_classes=768,
                                                head_bias=False),
}

# Input normalization (mean, std in [0, 1] pixel units) each variant's weights expect.
NORMALIZATION = {
    name: ((CLIP_MEAN, CLIP_STD) if "clip" in name else
           (INCEPTION_MEAN, INCEPTION_STD) if "btsp" in name else (IMAGENET_MEAN, IMAGENET_STD))
    for name in VARIANTS
}


def get_config(name: str, **overrides) -> SparseFormerConfig:
  """The named variant's config with `overrides` applied; clear errors for unknown names/fields."""
  if name not in VARIANTS:
    raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(sorted(VARIANTS))}.")
  fields = {f.name for f in dataclasses.fields(SparseFormerConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown model field(s) {unknown} for {name!r}. Known fields: "
                     f"{', '.join(sorted(fields))}.")
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  return SparseFormerConfig(**{**VARIANTS[name], **overrides}).validate()


def parse_overrides(items) -> dict:
  """Command-line 'field=value' strings -> {field: value}; values are Python literals, or bare
  strings (['num_classes=10', 'flavor=library'] -> {'num_classes': 10, 'flavor': 'library'})."""
  overrides = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"Model override {item!r}: expected field=value, e.g. num_classes=10.")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return overrides
