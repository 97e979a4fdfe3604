"""The exact GELU: jax.nn.gelu's erfc form, and beside it the erf form that a CPU trace takes
instead (`selection.use_cpu_workarounds`; figures in docs/performance.md)."""
import math

import jax

from sparseformer_jax.ops.selection import use_cpu_workarounds


def gelu(x):
  """Exact GELU x/2 (1 + erf(x/sqrt 2)), as PyTorch's nn.GELU (not the tanh approximation)."""
  if use_cpu_workarounds():
    return _gelu_erf(x)
  return jax.nn.gelu(x, approximate=False)


def _gelu_erf(x):
  """XLA:CPU: written with erf, twice as fast there as the erfc form. (Serialized, erf becomes
  an op that TensorFlow's XlaCallModule cannot read yet: exports take the erfc form.)"""
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
