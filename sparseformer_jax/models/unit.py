"""The SparseFormer unit (SFUnit): a list of ops applied `repeats` times with shared weights.

Ops (docs/model.md §3, §6): 'attn' self-attention, 'roi_adjust' move/resize the RoIs,
'sampling' generate points in the RoIs, sample the feature map and decode with adaptive mixing,
'mlp', and 'pe_inject' add an encoding of the RoI. Every repeat has its own drop-path rate.
"""
from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from sparseformer_jax.models import roi as roi_lib
from sparseformer_jax.models.config import SparseFormerConfig
from sparseformer_jax.models.layers import (Attention, Mlp, dense, drop_path, gelu, layer_norm,
                                            read_tokens, residual_add, trunc_normal)
from sparseformer_jax.models.mixing import AdaptiveMixing
from sparseformer_jax.models.sampling import clamp_gradient, sample_features


class RoiAdjust(nn.Module):
  """Token -> RoI delta (centers, log-sizes): LN -> Linear, or LN -> Linear -> GELU -> Linear."""
  dims: int
  hidden: int        # 0: a single Linear (v1); else the btsp MLP's hidden width
  ln_eps: float
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    h = layer_norm(self.ln_eps, self.dtype, "norm", width=x.shape[-1])(x)
    if self.hidden:
      h = gelu(dense(self.hidden, self.dtype, "fc")(h))
    return dense(2 * self.dims, self.dtype, "proj", use_bias=False,
                 kernel_init=nn.initializers.zeros)(h)                     # (B, N, 2D)


class PointGenerator(nn.Module):
  """Token + RoI -> absolute sampling points (B, N, P, D): LN -> Linear (+ a learned bias),
  standardized over the points and placed in the RoI."""
  num_points: int
  dims: int
  ln_eps: float
  offset_eps: float
  zero_init: bool
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, rois):
    size = self.num_points * self.dims
    offsets = layer_norm(self.ln_eps, self.dtype, "norm", width=x.shape[-1])(x)
    offsets = dense(size, self.dtype, "proj", use_bias=False,
                    kernel_init=nn.initializers.zeros if self.zero_init else trunc_normal(0.02)
                    )(offsets)
    bias = self.param("bias", roi_lib.offset_bias_init(self.num_points, self.dims), (size,))
    offsets = offsets.astype(jnp.float32) + bias
    offsets = offsets.reshape(*x.shape[:-1], self.num_points, self.dims)  # (B, N, P, D)
    return roi_lib.sampling_points(rois, offsets, self.offset_eps)


class SFUnit(nn.Module):
  """Runs `ops` `repeats` times on (tokens (B, N, width), rois (B, N, 2D)) over a feature map.

  With `head` ('avg' or 'cls', for a unit whose last op is 'mlp') it returns the head's read-out
  (B, width) of the final tokens instead of the tokens: the read-out is linear over tokens, so it
  is taken before the last fc2 and the residual add, which then run on B rows instead of B * N.
  """
  config: SparseFormerConfig
  width: int
  ops: Tuple[str, ...]
  repeats: int
  drop_path_rates: Tuple[float, ...]
  head: Optional[str] = None

  @nn.compact
  def __call__(self, features, x, rois, train: bool = False):
    cfg, dtype = self.config, self.config.dtype
    ops = set(self.ops)
    norm = lambda name: layer_norm(cfg.ln_eps, dtype, name)
    if "attn" in ops:
      attn_norm, attn = norm("attn_norm"), Attention(cfg.heads(self.width), dtype, name="attn")
    if "mlp" in ops:
      act = "quick_gelu" if cfg.quick_gelu and self.repeats == 1 else "gelu"
      mlp_norm, mlp = norm("mlp_norm"), Mlp(self.width * cfg.mlp_ratio, act, dtype, name="mlp")
    if "roi_adjust" in ops:
      adjust = RoiAdjust(cfg.dims, self.width if cfg.roi_adjust_mlp else 0, cfg.ln_eps, dtype,
                         name="roi_adjust")
    if "sampling" in ops:
      points_of = PointGenerator(cfg.num_points, cfg.dims, cfg.ln_eps,
                                 cfg.flavor_value("offset_eps"),
                                 cfg.flavor_value("zero_offset_init"), dtype, name="offsets")
      mixing = AdaptiveMixing(
          max(cfg.num_points, cfg.flavor_value("min_mixing_out_points")),
          cfg.generator_hidden or self.width // 4, cfg.flavor_value("generator_ln_eps"),
          cfg.mixing_bias, dtype, name="mixing")
    if "pe_inject" in ops:
      pe_norm, pe_proj = norm("pe_norm"), dense(self.width, dtype, "pe_proj")
    if cfg.stage_embedding and self.repeats > 1:
      stage = self.param("stage_embedding", nn.initializers.normal(1.0), (self.repeats, self.width))

    for i, rate in enumerate(self.drop_path_rates):
      residual = lambda x, h: residual_add(self, x, h, rate, train)
      if cfg.stage_embedding and self.repeats > 1:
        x = x + stage[i].astype(x.dtype)
      for j, op in enumerate(self.ops):
        if op == "attn":
          x = residual(x, attn(attn_norm(x)))
        elif op == "mlp" and self.head and (i, j) == (len(self.drop_path_rates) - 1,
                                                     len(self.ops) - 1):
          x = residual(read_tokens(x, self.head), mlp(mlp_norm(x), self.head))   # (B, width)
        elif op == "mlp":
          x = residual(x, mlp(mlp_norm(x)))
        elif op == "roi_adjust":
          delta = adjust(x)
          if not cfg.roi_adjust_mlp:
            delta = drop_path(self, delta, rate, train)
          rois = roi_lib.adjust_rois(rois, delta)
        elif op == "sampling":
          points = points_of(x, rois)                                      # (B, N, P, D)
          self.sow("intermediates", "points", points)
          if cfg.grad_clamp and not cfg.video:   # the official video sampler never clamps
            points = clamp_gradient(points, 1.0 / features.shape[-3])
          batch, tokens, num_points, dims = points.shape
          sampled = sample_features(features, points.reshape(batch, -1, dims), cfg.padding)
          sampled = sampled.reshape(batch, tokens, num_points, -1)        # (B, N, P, C)
          x = residual(x, mixing(sampled, x))
        elif op == "pe_inject":
          # The official video code has no RoI encoding yet: it injects pe_proj(pe_norm(0)).
          encoding = (jnp.zeros_like(x) if cfg.video else
                      roi_lib.roi_encoding(rois, self.width).astype(x.dtype))
          x = x + pe_proj(pe_norm(encoding))
      self.sow("intermediates", "rois", rois)
      self.sow("intermediates", "embeddings", x)
    return x, rois
