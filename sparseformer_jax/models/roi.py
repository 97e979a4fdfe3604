"""RoI geometry: initial token RoIs, RoI adjustment, sampling points and the RoI encoding.

A RoI is (lo_1..lo_D, hi_1..hi_D) in normalized coordinates, D = 2 (x, y) or 3 (x, y, t).
All of it runs in float32 whatever the compute dtype.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np


def initial_rois(num_tokens: int, dims: int = 2, replicates: int = 1) -> np.ndarray:
  """(replicates * num_tokens, 2 * dims) starting RoIs (docs/model.md §2, §7).

  With r = floor(sqrt(N)), token i * r + j covers [0.5 i/(r-1), +0.5] in x and [0.5 j/(r-1),
  +0.5] in y; tokens past r*r cover the whole image. Video replica k spans time [k/R, (k+1)/R]
  and holds tokens k*N .. k*N + N-1.
  """
  rois = np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (num_tokens, 1))
  root = int(math.isqrt(num_tokens))
  if root > 1:
    grid = np.arange(root, dtype=np.float32) / (root - 1) * 0.5
    x1, y1 = np.meshgrid(grid, grid, indexing="ij")            # x follows the outer index
    lo = np.stack([x1.ravel(), y1.ravel()], axis=-1)
    rois[: root * root] = np.concatenate([lo, lo + 0.5], axis=-1)
  elif root == 1 and num_tokens == 1:
    rois[0] = (0.0, 0.0, 1.0, 1.0)                              # a single token sees everything
  if dims == 2:
    return rois
  spans = np.arange(replicates, dtype=np.float32)[:, None] / replicates
  spans = np.concatenate([spans, spans + 1.0 / replicates], axis=-1)   # (R, 2)
  rois = np.broadcast_to(rois, (replicates, num_tokens, 4))
  spans = np.broadcast_to(spans[:, None], (replicates, num_tokens, 2))
  video = np.concatenate([rois[..., :2], spans[..., :1], rois[..., 2:], spans[..., 1:]], -1)
  return video.reshape(replicates * num_tokens, 6).astype(np.float32)


def offset_bias_init(num_points: int, dims: int = 2):
  """Initializer of the (num_points * dims,) offset bias: a sqrt(P) x sqrt(P) grid centred on 0.

  Point a*r + b sits at (lin[b] - 0.5, lin[a] - 0.5), lin = linspace(0.5/r, 1 - 0.5/r, r)
  (x follows the inner index); a time offset starts at 0. When P is not a square the official
  code draws uniform(-0.5, 0.5) instead.
  """
  def init(key, shape, dtype=jnp.float32):
    root = math.isqrt(num_points)
    if root * root == num_points:
      lin = jnp.linspace(0.5 / root, 1 - 0.5 / root, root, dtype=jnp.float32)
      y, x = jnp.meshgrid(lin, lin, indexing="ij")
      offsets = jnp.stack([x.ravel(), y.ravel()], axis=-1) - 0.5
    else:
      offsets = jax.random.uniform(key, (num_points, 2), jnp.float32, -0.5, 0.5)
    if dims == 3:
      offsets = jnp.concatenate([offsets, jnp.zeros_like(offsets[:, :1])], axis=-1)
    return offsets.reshape(shape).astype(dtype)
  return init


def _center_size(rois):
  dims = rois.shape[-1] // 2
  lo, hi = rois[..., :dims], rois[..., dims:]
  return (lo + hi) * 0.5, hi - lo


def adjust_rois(rois: jax.Array, delta: jax.Array) -> jax.Array:
  """Moves each RoI's center by delta[:D] times its size and scales its size by exp(delta[D:])."""
  dims = rois.shape[-1] // 2
  rois, delta = rois.astype(jnp.float32), delta.astype(jnp.float32)
  center, size = _center_size(rois)
  size = jnp.abs(size)
  center = center + delta[..., :dims] * size
  size = size * jnp.exp(delta[..., dims:])
  return jnp.concatenate([center - 0.5 * size, center + 0.5 * size], axis=-1)


def sampling_points(rois: jax.Array, offsets: jax.Array, eps: float) -> jax.Array:
  """Absolute points (B, N, P, D) from RoIs (B, N, 2D) and raw offsets (B, N, P, D).

  Offsets are standardized per token and coordinate over the P points, `(o - mean) / (3 (std +
  eps))` with the unbiased std, then scaled by the RoI's (signed) size around its center.
  """
  offsets = offsets.astype(jnp.float32)
  mean = offsets.mean(axis=-2, keepdims=True)
  var = jnp.var(offsets, axis=-2, keepdims=True, ddof=1)
  # sqrt has an infinite slope at 0: equal offsets (e.g. the zero time offsets of inflated video
  # weights) would give NaN gradients, where PyTorch's std gives 0.
  std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
  offsets = (offsets - mean) / (3.0 * (std + eps))
  center, size = _center_size(rois.astype(jnp.float32))
  return center[..., None, :] + offsets * size[..., None, :]


def roi_encoding(rois: jax.Array, width: int, max_temperature: float = 128.0) -> jax.Array:
  """Sin-cos encoding (B, N, width) of every RoI coordinate, without gradient (btsp PE_INJECT).

  Each coordinate c gives F = width / num_coords values c*pi*f, f = exp(linspace(0, log T, F));
  the sines of the even slots then the cosines of the odd slots, coordinates one after another.
  """
  rois = jax.lax.stop_gradient(rois.astype(jnp.float32))
  num_coords = rois.shape[-1]
  feats = width // num_coords
  freqs = jnp.exp(jnp.linspace(0.0, math.log(max_temperature), feats, dtype=jnp.float32))
  angles = rois[..., None] * math.pi * freqs                    # (B, N, 2D, F)
  enc = jnp.concatenate([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
  return enc.reshape(*rois.shape[:-1], num_coords * feats)
