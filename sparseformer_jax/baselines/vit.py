"""A plain pre-LayerNorm ViT: the dense baseline of the benchmark, and the teacher that
bootstrapped SparseFormers inherit their ViT blocks from.

Built from the same blocks as SparseFormer (models/layers.py): a ViT block here has the params of
a SparseFormer cortex unit ('attn_norm', 'attn', 'mlp_norm', 'mlp'), so weights move between the
two unchanged. Covers DeiT/timm, AugReg (google-research/vision_transformer, big_vision) and CLIP
image towers: CLS or average pooling, a position embedding with or without a CLS row, CLIP's
LayerNorm before the blocks (`pre_norm`) and QuickGELU, a biased classifier or CLIP's unbiased
projection. Every patch is a token, so its cost grows with the image area (and attention with its
square), where SparseFormer's latent tokens stay fixed. The position embedding is sized to the
patch grid of the images seen at `init`.
"""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sparseformer_jax.models.layers import (Attention, Mlp, dense, layer_norm, residual_add,
                                            trunc_normal)

POOLS = ("cls", "gap", "gap_fc_norm")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Structure of a pre-LayerNorm ViT."""
  num_classes: int = 1000          # head outputs (a CLIP projection's width); 0: no head
  patch: int = 16
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: int = 4
  drop_path_rate: float = 0.1
  ln_eps: float = 1e-6
  # "cls": the CLS token; "gap": mean of the normed patch tokens (big_vision); "gap_fc_norm":
  # norm of the patch tokens' mean (timm's fc_norm).
  pool: str = "cls"
  class_token: bool = True         # a CLS token is prepended (any pool)
  cls_position: bool = True        # the position embedding has a row for the CLS token
  patch_bias: bool = True          # CLIP's patch embedding has no bias
  pre_norm: bool = False           # CLIP: a LayerNorm on the tokens before the first block
  activation: str = "gelu"         # "gelu" (exact) | "quick_gelu" (OpenAI CLIP)
  head_bias: bool = True           # CLIP's projection has no bias
  dtype: str = "float32"           # compute dtype; params are always float32

  def validate(self):
    """Raises ValueError naming the field when the combination cannot be built."""
    if self.pool not in POOLS:
      raise ValueError(f"pool={self.pool!r}: expected one of {POOLS}.")
    if self.pool == "cls" and not self.class_token:
      raise ValueError("pool='cls' needs class_token=True.")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by its {self.num_heads} heads.")
    return self


VIT_VARIANTS = {
    "vit_ti16": dict(width=192, depth=12, num_heads=3, drop_path_rate=0.1),   # DeiT-Ti, 1.3 GMACs
    "vit_s16": dict(width=384, depth=12, num_heads=6, drop_path_rate=0.1),    # DeiT-S, 4.6 GMACs
    "vit_b16": dict(width=768, depth=12, num_heads=12, drop_path_rate=0.0),   # AugReg B/16
    "vit_l16": dict(width=1024, depth=24, num_heads=16, drop_path_rate=0.0),  # AugReg L/16
    "clip_b16": dict(width=768, depth=12, num_heads=12, drop_path_rate=0.0, num_classes=512,
                     patch_bias=False, pre_norm=True, activation="quick_gelu", head_bias=False,
                     ln_eps=1e-5),
    "clip_l14": dict(patch=14, width=1024, depth=24, num_heads=16, drop_path_rate=0.0,
                     num_classes=768, patch_bias=False, pre_norm=True, activation="quick_gelu",
                     head_bias=False, ln_eps=1e-5),
}


class Block(nn.Module):
  """Pre-LN transformer block: x + dp(MHA(LN(x))), then x + dp(MLP(LN(x)))."""
  config: ViTConfig
  drop_path_rate: float

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg = self.config
    h = Attention(cfg.num_heads, cfg.dtype, name="attn")(layer_norm(cfg.ln_eps, cfg.dtype,
                                                                     "attn_norm")(x))
    x = residual_add(self, x, h, self.drop_path_rate, train)
    h = Mlp(cfg.width * cfg.mlp_ratio, cfg.activation, cfg.dtype, name="mlp")(
        layer_norm(cfg.ln_eps, cfg.dtype, "mlp_norm")(x))
    return residual_add(self, x, h, self.drop_path_rate, train)


class ViT(nn.Module):
  """Images (B, H, W, 3) -> logits (B, num_classes), or the pooled features (B, width) without
  a head; float32."""
  config: ViTConfig

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg = self.config
    x = nn.Conv(cfg.width, (cfg.patch, cfg.patch), strides=cfg.patch, padding="VALID",
                use_bias=cfg.patch_bias, dtype=cfg.dtype, param_dtype=jnp.float32,
                name="patch_embed")(images)
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, cfg.width)                       # (B, L, D)
    rows = grid_h * grid_w + (cfg.class_token and cfg.cls_position)
    pos = self.param("pos_embedding", trunc_normal(0.02), (rows, cfg.width)).astype(x.dtype)
    if not cfg.cls_position:
      x = x + pos
    if cfg.class_token:
      cls = self.param("cls_embedding", trunc_normal(0.02), (1, 1, cfg.width))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, cfg.width)), x], 1)
    if cfg.cls_position:
      x = x + pos                                                          # (B, 1 + L, D)
    if cfg.pre_norm:
      x = layer_norm(cfg.ln_eps, cfg.dtype, "pre_norm")(x)
    rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth)
    for i, rate in enumerate(rates):
      x = Block(cfg, float(rate), name=f"block_{i}")(x, train)
    norm = layer_norm(cfg.ln_eps, cfg.dtype, "head_norm")
    patches = x[:, int(cfg.class_token):]                                  # (B, L, D)
    if cfg.pool == "cls":
      x = norm(x[:, 0])
    elif cfg.pool == "gap":
      x = norm(patches).mean(axis=1)
    else:
      x = norm(patches.mean(axis=1))                                       # (B, D)
    if cfg.num_classes:
      x = dense(cfg.num_classes, cfg.dtype, "head", use_bias=cfg.head_bias)(x)
    return x.astype(jnp.float32)


def create_vit(name: str, **overrides) -> ViT:
  """The named ViT (see `VIT_VARIANTS`) with config fields overridden by kwargs."""
  if name not in VIT_VARIANTS:
    raise ValueError(f"Unknown ViT {name!r}. Known: {', '.join(sorted(VIT_VARIANTS))}.")
  return ViT(ViTConfig(**{**VIT_VARIANTS[name], **overrides}).validate())
