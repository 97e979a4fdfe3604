"""A plain ViT (DeiT/ViT-Ti/S/16 style): the dense baseline the benchmark compares against.

Built from the same blocks as SparseFormer (models/layers.py) so that a speed comparison measures
the architectures, not two code bases. Every patch is a token, so its cost grows with the image
area (and attention with its square), where SparseFormer's latent tokens stay fixed. The position
embedding is sized to the patch grid of the images seen at `init`.
"""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sparseformer_jax.models.layers import Attention, Mlp, dense, layer_norm, residual_add, trunc_normal


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Structure of a ViT with a CLS token and a pre-LayerNorm transformer."""
  num_classes: int = 1000
  patch: int = 16
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: int = 4
  drop_path_rate: float = 0.1
  ln_eps: float = 1e-6
  dtype: str = "float32"           # compute dtype; params are always float32


VIT_VARIANTS = {
    "vit_ti16": dict(width=192, depth=12, num_heads=3, drop_path_rate=0.1),   # DeiT-Ti, 1.3 GMACs
    "vit_s16": dict(width=384, depth=12, num_heads=6, drop_path_rate=0.1),    # DeiT-S, 4.6 GMACs
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
    h = Mlp(cfg.width * cfg.mlp_ratio, "gelu", cfg.dtype, name="mlp")(
        layer_norm(cfg.ln_eps, cfg.dtype, "mlp_norm")(x))
    return residual_add(self, x, h, self.drop_path_rate, train)


class ViT(nn.Module):
  """Images (B, H, W, 3) -> logits (B, num_classes), float32."""
  config: ViTConfig

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg = self.config
    x = nn.Conv(cfg.width, (cfg.patch, cfg.patch), strides=cfg.patch, padding="VALID",
                dtype=cfg.dtype, param_dtype=jnp.float32, name="patch_embed")(images)
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, cfg.width)                       # (B, L, D)
    cls = self.param("cls_embedding", trunc_normal(0.02), (1, 1, cfg.width))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, cfg.width)), x], axis=1)
    pos = self.param("pos_embedding", trunc_normal(0.02), (1 + grid_h * grid_w, cfg.width))
    x = x + pos.astype(x.dtype)                                            # (B, 1 + L, D)
    rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth)
    for i, rate in enumerate(rates):
      x = Block(cfg, float(rate), name=f"block_{i}")(x, train)
    x = layer_norm(cfg.ln_eps, cfg.dtype, "head_norm")(x[:, 0])
    return dense(cfg.num_classes, cfg.dtype, "head")(x).astype(jnp.float32)


def create_vit(name: str, **overrides) -> ViT:
  """The named baseline (see `VIT_VARIANTS`) with config fields overridden by kwargs."""
  if name not in VIT_VARIANTS:
    raise ValueError(f"Unknown ViT {name!r}. Known: {', '.join(sorted(VIT_VARIANTS))}.")
  return ViT(ViTConfig(**{**VIT_VARIANTS[name], **overrides}))
