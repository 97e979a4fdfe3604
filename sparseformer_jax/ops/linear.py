"""Matmuls (einsum, dense, batched matmul) and the residual add.

Each plain version is followed by the XLA:CPU version that a CPU trace takes instead
(`selection.use_cpu_workarounds`); the measurements behind them are in docs/performance.md.
"""
import itertools

import jax
import jax.numpy as jnp

from sparseformer_jax.ops.selection import use_cpu_workarounds


def einsum(equation: str, a, b):
  """jnp.einsum of two operands, the result in a's dtype. In bfloat16, GPUs and TPUs sum in
  float32 and round the result; so do its gradients, whose operands stay bfloat16."""
  if use_cpu_workarounds():
    return _einsum_f32(equation, a, b)
  return jnp.einsum(equation, a, b)


def _einsum_f32(equation: str, a, b):
  """XLA:CPU: the einsum asks for a float32 result, then rounds it to a's dtype: only then does
  XLA:CPU run a bfloat16 matmul on the CPU's bfloat16 units (docs/performance.md, "bfloat16 on
  the CPU"). Its gradients then take float32 operands, which XLA:CPU runs as fast."""
  return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def dense(x, kernel, bias=None):
  """x (..., K) @ kernel (K, F) + bias (F,), in x's dtype; a float32 bias is added in float32,
  before the result is rounded to x's dtype."""
  if use_cpu_workarounds():
    out = _dense_2d(x, kernel)
  else:
    out = jnp.einsum("...k,kf->...f", x, kernel)
  if bias is not None:
    out = out + bias
  return out.astype(x.dtype)


def _dense_2d(x, kernel):
  """XLA:CPU: ONE 2-D matmul (M, K) @ (K, F) with a float32 result (see `_einsum_f32`), whose
  weight gradient needs no transposed copy of the incoming gradient (docs/performance.md)."""
  flat = x.reshape(-1, x.shape[-1])
  out = jnp.einsum("mk,kn->mn", flat, kernel, preferred_element_type=jnp.float32)
  return out.reshape(*x.shape[:-1], kernel.shape[-1])


def split_dense(x, kernel, bias, sizes):
  """dense(x (M, K), kernel, bias) cut along its outputs into blocks of `sizes`: a list of
  (M, size) arrays in x's dtype."""
  if use_cpu_workarounds():
    return _split_dense_blocks(x, kernel, bias, sizes)
  out = dense(x, kernel.astype(x.dtype), bias)
  return jnp.split(out, list(itertools.accumulate(sizes))[:-1], axis=-1)


def _split_dense_blocks(x, kernel, bias, sizes):
  """XLA:CPU: one matmul per block, the bias an extra kernel row met by a column of ones, the
  kernel cut by one split: no big output copied into its parts, no separate bias pass, one
  concatenation in the gradient (docs/performance.md, "What made it faster")."""
  flat = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
  kernel = jnp.concatenate([kernel, bias[None]], axis=0).astype(x.dtype)   # (K + 1, sum(sizes))
  blocks = jnp.split(kernel, list(itertools.accumulate(sizes))[:-1], axis=1)
  return [_einsum_f32("mk,kn->mn", flat, block) for block in blocks]


def matmul(a, b):
  """Batched a @ b: (..., M, K) @ (..., K, N) -> (..., M, N) in a's dtype."""
  if use_cpu_workarounds():
    return _matmul_cpu(a, b)
  return jnp.matmul(a, b)


@jax.custom_vjp
def _matmul_cpu(a, b):
  """XLA:CPU: b's gradient a^T @ g from a transposed copy of a, a matmul XLA:CPU gives to
  YNNPACK instead of a slow Eigen one (docs/performance.md, "What made it faster")."""
  return _einsum_f32("...mk,...kn->...mn", a, b)


def _matmul_cpu_fwd(a, b):
  return _matmul_cpu(a, b), (a, b)


def _matmul_cpu_bwd(residuals, g):
  a, b = residuals
  d_a = _einsum_f32("...mn,...kn->...mk", g, b)
  # The optimization barrier keeps XLA from folding the transpose back into the matmul.
  a_transposed = jax.lax.optimization_barrier(jnp.swapaxes(a, -1, -2))
  d_b = _einsum_f32("...km,...mn->...kn", a_transposed, g)
  return d_a, d_b


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


def add(x, y):
  """x + y: a residual connection."""
  if use_cpu_workarounds():
    return _add_materializing_gradient(x, y)
  return x + y


def _add_materializing_gradient(x, y):
  """XLA:CPU: x + y whose gradient is computed once, into a buffer, instead of being re-fused
  into every consumer along the residual stream (docs/performance.md, "What made it faster")."""
  return _materialize_gradient(x + y)


@jax.custom_vjp
def _materialize_gradient(x):
  return x


def _materialize_gradient_fwd(x):
  return x, None


def _materialize_gradient_bwd(_, g):
  # A conditional is a boundary XLA:CPU's fusion cannot cross (it drops optimization barriers
  # first). The branches differ (g + 0.0 only runs when g starts with a NaN) so that XLA
  # cannot merge them.
  first = g.reshape(-1)[0]
  return (jax.lax.cond(jnp.isnan(first), lambda g: g + 0.0, lambda g: g, g),)


_materialize_gradient.defvjp(_materialize_gradient_fwd, _materialize_gradient_bwd)
