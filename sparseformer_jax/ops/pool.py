"""The stem's max-pool (3x3 windows, stride 2, padding 1): the plain reduce-window, and beside
it the XLA:CPU version over parity phases that a CPU trace takes instead
(`selection.use_cpu_workarounds`; figures in docs/performance.md)."""
import jax
import jax.numpy as jnp
import numpy as np

from sparseformer_jax.ops.selection import use_cpu_workarounds


def max_pool(x):
  """PyTorch's MaxPool2d(3, stride=2, padding=1) of (B, H, W, C): (B, ceil(H/2), ceil(W/2), C)."""
  if use_cpu_workarounds():
    return _max_pool_by_phases(x)
  return jax.lax.reduce_window(x, np.array(-np.inf, x.dtype), jax.lax.max, (1, 3, 3, 1),
                               (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


def _shifted(x, axis: int):
  """x[i - 1] along `axis`, -inf at i = 0."""
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (1, -1, 0)
  return jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype), config)


def _max3(even, odd, axis: int):
  """Windows of 3 with stride 2 and one -inf of padding in front, given the even and odd
  elements along `axis`: window i is the max of even[i], odd[i] and odd[i - 1]."""
  config = [(0, 0, 0)] * odd.ndim
  config[axis] = (0, even.shape[axis] - odd.shape[axis], 0)    # odd lengths: one odd fewer
  odd = jax.lax.pad(odd, jnp.array(-jnp.inf, odd.dtype), config)
  return jnp.maximum(jnp.maximum(even, odd), _shifted(odd, axis))


def _max_pool_by_phases(x):
  """XLA:CPU: `max_pool` as elementwise maxima of the four (row, column) parity phases, so that
  every shift and every gradient is of a quarter-size array (the gradient of XLA:CPU's
  reduce-window, a select-and-scatter, is 3-4x slower)."""
  rows = [_max3(x[:, a::2, 0::2], x[:, a::2, 1::2], axis=2) for a in (0, 1)]
  return _max3(rows[0], rows[1], axis=1)
