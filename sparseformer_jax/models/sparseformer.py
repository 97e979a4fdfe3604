"""SparseFormer: stem -> latent tokens -> focusing transformer -> cortex transformer -> head.

The focusing transformer is one SFUnit repeated (shared weights) at a narrow width; the cortex
transformer is a stack of SFUnits at a wider width whose first unit samples once more. Images are
(B, H, W, 3) and videos (B, T, H, W, 3), normalized, of any size (docs/model.md §4, §6, §7).
"""
from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sparseformer_jax.models import roi as roi_lib
from sparseformer_jax.models.config import SparseFormerConfig
from sparseformer_jax.models.layers import dense, layer_norm, read_tokens, trunc_normal
from sparseformer_jax.models.stem import KERNEL, Stem
from sparseformer_jax.models.unit import SFUnit


class Cortex(nn.Module):
  """The cortex units in order; a CLS token (no RoI) is prepended before `cls_insert_unit`.

  With `read_out`, returns the head's read-out (B, width) of the final tokens instead of the
  tokens (B, N, width), computed more cheaply (see `SFUnit.head`).
  """
  config: SparseFormerConfig
  drop_path_rates: Tuple[float, ...]
  read_out: bool = False

  @nn.compact
  def __call__(self, features, x, rois, train: bool = False):
    cfg = self.config
    specs, unit_reads_out = cfg.unit_specs()[1:], False
    for k, (width, ops, repeats) in enumerate(specs):
      if k + 1 == cfg.cls_insert_unit:
        cls = self.param("cls_embedding", nn.initializers.normal(1.0), (1, width))
        cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, width))
        x = jnp.concatenate([cls, x], axis=1)
      unit_reads_out = self.read_out and k == len(specs) - 1 and ops[-1] == "mlp"
      x, rois = SFUnit(cfg, width, tuple(ops), repeats, (self.drop_path_rates[k],),
                       cfg.head if unit_reads_out else None, name=f"unit_{k}")(
                           features, x, rois, train)
    if self.read_out and not unit_reads_out:
      x = read_tokens(x, cfg.head)
    return x, rois


class SparseFormer(nn.Module):
  """Images or videos -> logits (B, num_classes), float32."""
  config: SparseFormerConfig

  def _check_input(self, images):
    cfg = self.config
    rank = 5 if cfg.video else 4
    layout = "(B, T, H, W, 3)" if cfg.video else "(B, H, W, 3)"
    if images.ndim != rank:
      raise ValueError(f"Expected {'videos' if cfg.video else 'images'} of shape {layout}, got "
                       f"shape {images.shape} (rank {images.ndim}). Images are channel-last (NHWC).")
    if images.shape[-1] != 3:
      raise ValueError(f"Expected 3 channels (RGB) in the last axis, got shape {images.shape}; "
                       "transpose NCHW inputs to NHWC.")
    if min(images.shape[-3:-1]) < KERNEL:
      raise ValueError(f"Input of {images.shape[-3]}x{images.shape[-2]} pixels is too small for "
                       f"the stem's {KERNEL}x{KERNEL} convolution; use at least {KERNEL}x{KERNEL}.")

  @nn.compact
  def __call__(self, images, train: bool = False):
    cfg = self.config
    self._check_input(images)
    dtype = cfg.dtype
    features = Stem(cfg.conv_dim, cfg.flavor_value("stem_unbiased_var"),
                    cfg.flavor_value("stem_eps"), dtype, name="stem")(images)
    self.sow("intermediates", "features", features)
    features = features.astype(dtype)
    batch = images.shape[0]

    rois = self.param("initial_roi",
                      lambda *_: jnp.asarray(roi_lib.initial_rois(cfg.num_tokens, cfg.dims,
                                                                  cfg.replicates)),
                      (cfg.total_tokens, 2 * cfg.dims))
    rois = jnp.broadcast_to(rois, (batch, *rois.shape))                    # (B, N, 2D) float32
    embed_rows = 1 if cfg.shared_initial_embedding else cfg.total_tokens
    x = self.param("initial_embedding", trunc_normal(1.0), (embed_rows, cfg.focusing_width))
    x = jnp.broadcast_to(x.astype(dtype), (batch, cfg.total_tokens, cfg.focusing_width))

    rates = tuple(float(r) for r in
                  np.linspace(0.0, cfg.drop_path_rate, cfg.focusing_repeats + cfg.cortex_depth))
    width, ops, repeats = cfg.unit_specs()[0]
    x, rois = SFUnit(cfg, width, tuple(ops), repeats, rates[:repeats], name="focusing")(
        features, x, rois, train)
    if cfg.cortex_width != cfg.focusing_width:
      x = dense(cfg.cortex_width, dtype, "transition")(x)
      if cfg.transition_norm:
        x = layer_norm(cfg.ln_eps, dtype, "transition_norm")(x)
    # The head reads the token mean or the CLS token: the last cortex unit computes just that,
    # unless the final tokens themselves are being collected as intermediates.
    read_out = not self.is_mutable_collection("intermediates")
    x, rois = Cortex(cfg, rates[repeats:], read_out, name="cortex")(features, x, rois, train)
    if not read_out:
      x = read_tokens(x, cfg.head)                                          # (B, width)
    x = layer_norm(cfg.ln_eps, dtype, "head_norm")(x)
    logits = dense(cfg.num_classes, dtype, "head", use_bias=cfg.head_bias)(x)
    return logits.astype(jnp.float32)
