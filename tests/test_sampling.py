"""Gather-based bilinear/trilinear sampling against a plain NumPy grid_sample, and the clamp."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sparseformer_jax.models.sampling import clamp_gradient, sample_features


def reference_grid_sample(features, points, padding):
  """PyTorch grid_sample(align_corners=False) for one point at a time, written plainly."""
  batch, *spatial, channels = features.shape
  sizes = spatial[::-1]
  out = np.zeros((batch, points.shape[1], channels))
  for b in range(batch):
    for m in range(points.shape[1]):
      coords = [points[b, m, d] * sizes[d] - 0.5 for d in range(len(sizes))]
      if padding == "border":
        coords = [min(max(c, 0.0), s - 1.0) for c, s in zip(coords, sizes)]
      lows = [int(np.floor(c)) for c in coords]
      for corner in itertools.product((0, 1), repeat=len(sizes)):
        pos = [lo + o for lo, o in zip(lows, corner)]
        if any(p < 0 or p >= s for p, s in zip(pos, sizes)):
          continue
        weight = np.prod([(c - lo) if o else (1 - (c - lo))
                          for c, lo, o in zip(coords, lows, corner)])
        out[b, m] += weight * features[(b, *pos[::-1])]
  return out


def make_points(rng, batch, dims):
  """Points inside, exactly on pixel centres and map edges, and outside the map."""
  inside = rng.uniform(0.05, 0.95, (batch, 12, dims))
  edges = np.array([[0.0] * dims, [1.0] * dims, [0.5 / 5] * dims, [1 - 0.5 / 5] * dims])
  outside = np.array([[-0.3] * dims, [1.2] * dims, [-0.05] + [0.5] * (dims - 1),
                      [1.04] + [0.5] * (dims - 1), [-2.0] * dims])
  extra = np.broadcast_to(np.concatenate([edges, outside]), (batch, 9, dims))
  return np.concatenate([inside, extra], axis=1).astype(np.float32)


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("spatial", [(5, 7), (3, 5, 4)], ids=["bilinear", "trilinear"])
def test_matches_reference_grid_sample(padding, spatial):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, *spatial, 3)).astype(np.float32)
  points = make_points(rng, 2, len(spatial))
  got = sample_features(jnp.asarray(features), jnp.asarray(points), padding)
  want = reference_grid_sample(features, points, padding)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_zeros_padding_fades_out_and_border_clamps():
  features = jnp.ones((1, 4, 4, 1))
  far = jnp.array([[[-1.0, 0.5], [0.5, 2.0]]])
  np.testing.assert_allclose(sample_features(features, far, "zeros"), 0.0)
  np.testing.assert_allclose(sample_features(features, far, "border"), 1.0)
  half = jnp.array([[[0.0, 0.5]]])           # x = -0.5 px: half of the weight is outside
  np.testing.assert_allclose(sample_features(features, half, "zeros"), 0.5)


@pytest.mark.parametrize("spatial", [(6, 5), (3, 4, 5)], ids=["bilinear", "trilinear"])
def test_gradients_where_smooth(spatial):
  rng = np.random.default_rng(1)
  features = jnp.asarray(rng.normal(size=(1, *spatial, 2)), jnp.float32)
  # Strictly inside cells (away from pixel centres), where sampling is differentiable.
  sizes = np.array(spatial[::-1])
  cells = rng.integers(0, sizes - 1, size=(1, 4, len(spatial)))
  points = jnp.asarray((cells + 0.5 + rng.uniform(0.2, 0.8, cells.shape)) / sizes, jnp.float32)
  f = lambda feat, pts: sample_features(feat, pts, "zeros")
  check_grads(f, (features, points), order=1, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-3)


def test_bfloat16_features_keep_float32_coordinates():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(1, 8, 8, 4)).astype(np.float32)
  points = rng.uniform(0, 1, (1, 10, 2)).astype(np.float32)
  got = sample_features(jnp.asarray(features, jnp.bfloat16), jnp.asarray(points))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), reference_grid_sample(features, points,
                                                                                 "zeros"),
                             atol=5e-2)


def test_rejects_mismatched_coordinates():
  with pytest.raises(ValueError, match="coordinates"):
    sample_features(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 3, 3)))


def test_clamp_gradient_is_identity_forward_and_clamps_backward():
  x = jnp.array([0.1, 0.2, 0.3])
  np.testing.assert_array_equal(clamp_gradient(x, 0.5), x)
  g = jax.grad(lambda v: jnp.sum(clamp_gradient(v, 0.5) * jnp.array([2.0, -3.0, 0.25])))(x)
  np.testing.assert_allclose(g, [0.5, -0.5, 0.25])
