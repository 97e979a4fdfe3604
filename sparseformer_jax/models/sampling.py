"""Bilinear (2-D) and trilinear (3-D) sampling of a channel-last feature map with gather ops.

Matches PyTorch `grid_sample(align_corners=False)` with zeros or border padding: a point at
normalized coordinate u in [0, 1] along an axis of size S sits at pixel u * S - 0.5
(docs/model.md §3).
"""
import functools
import itertools

import jax
import jax.numpy as jnp

from sparseformer_jax import ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def clamp_gradient(x, bound: float):
  """Identity whose backward pass clamps the incoming gradient elementwise to [-bound, bound].

  SparseFormer clamps the gradient reaching the sampling points to one feature-map pixel
  (1 / H_feat in normalized units) so that only local bilinear gradients steer the points.
  """
  return x


def _clamp_fwd(x, bound):
  del bound
  return x, None


def _clamp_bwd(bound, _, g):
  return (jnp.clip(g, -bound, bound),)


clamp_gradient.defvjp(_clamp_fwd, _clamp_bwd)


def sample_features(features: jax.Array, points: jax.Array, padding: str = "zeros") -> jax.Array:
  """Samples `features` (B, *S, C) at `points` (B, M, D), D = len(S) coordinates in [0, 1].

  Spatial axes S are (H, W) for images or (T, H, W) for video; a point's coordinates are ordered
  the other way round, (x, y) or (x, y, t). Returns (B, M, C) in the features' dtype. All 2**D
  neighbours of every point are fetched with ONE gather from the flattened map and blended with
  float32 weights; neighbours outside the map weigh 0 ('zeros') or the point is first clipped
  onto the map ('border').
  """
  batch, *spatial, channels = features.shape
  num_dims = len(spatial)
  if points.shape[-1] != num_dims:
    raise ValueError(f"points have {points.shape[-1]} coordinates, the map {num_dims} axes.")
  sizes = spatial[::-1]                                        # (W, H[, T]) in coordinate order
  strides = [1]
  for size in sizes[:-1]:
    strides.append(strides[-1] * size)                         # flat index = x + W*y + W*H*t

  coords = points.astype(jnp.float32) * jnp.asarray(sizes, jnp.float32) - 0.5   # (B, M, D)
  if padding == "border":
    coords = jnp.clip(coords, 0.0, jnp.asarray(sizes, jnp.float32) - 1.0)
  elif padding != "zeros":
    raise ValueError(f"padding={padding!r}: expected 'zeros' or 'border'.")
  low = jnp.floor(coords)
  frac = coords - low                                          # (B, M, D)
  low = low.astype(jnp.int32)

  indices, weights = [], []
  for corner in itertools.product((0, 1), repeat=num_dims):
    index = jnp.zeros(coords.shape[:-1], jnp.int32)
    weight = jnp.ones(coords.shape[:-1], jnp.float32)
    for d, (offset, size, stride) in enumerate(zip(corner, sizes, strides)):
      pos = low[..., d] + offset
      weight = weight * (frac[..., d] if offset else 1.0 - frac[..., d])
      weight = jnp.where((pos >= 0) & (pos < size), weight, 0.0)
      index = index + jnp.clip(pos, 0, size - 1) * stride
    indices.append(index)
    weights.append(weight)
  indices = jnp.stack(indices, axis=-1)                        # (B, M, 2**D)
  weights = jnp.stack(weights, axis=-1)                        # (B, M, 2**D)

  flat = features.reshape(batch, -1, channels)                 # (B, H*W[*T], C)
  gathered = jnp.take_along_axis(flat, indices.reshape(batch, -1, 1), axis=1,
                                 mode="promise_in_bounds")
  gathered = gathered.reshape(*indices.shape, channels)        # (B, M, 2**D, C)
  return ops.einsum("bmk,bmkc->bmc", weights.astype(features.dtype), gathered)
