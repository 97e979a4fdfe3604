"""Transformer building blocks shared by the SparseFormer units: Dense/LayerNorm with the official
initialization, exact GELU, QuickGELU, per-sample drop path, batched matmul, MLP and multi-head
self-attention."""
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

trunc_normal = nn.initializers.truncated_normal


def gelu(x):
  """Exact GELU x/2 (1 + erf(x/sqrt 2)), as PyTorch's nn.GELU (flax's default is the tanh
  approximation). Written with erf: twice as fast on CPU as jax.nn.gelu's erfc form."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def quick_gelu(x):
  """CLIP's QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def einsum(equation: str, a, b):
  """jnp.einsum of two operands with float32 sums, the result in a's dtype.

  Float32 operands: the plain einsum. Bfloat16 operands: XLA:CPU sums a bfloat16 matmul in
  float32 anyway, but only with a float32 result does it run the matmul on the CPU's bfloat16
  units (AMX): 4-5x faster than float32 on large row-major matmuls, where a bfloat16 result ran
  slower than float32. GPUs and TPUs sum in float32 too, so results are the same everywhere.
  """
  return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


class Dense(nn.Module):
  """nn.Dense's params ('kernel' (K, F), 'bias' (F,), float32) and result, as ONE 2-D matmul
  (..., K) -> (M, K) @ (K, F) whose float32 sum gets the bias before it is rounded to `dtype`.

  2-D: on XLA:CPU the weight gradient of a 2-D matmul needs no transposed copy of the incoming
  gradient; with N-D inputs XLA transposes it, recomputing the residual-gradient chain into
  every such copy (a third of a transformer block's backward pass). The bias in float32: with
  bfloat16 compute its gradient is then a float32 sum, which XLA:CPU runs 10x faster than a
  bfloat16 one (nn.Dense's). With float32 compute both are nn.Dense's ops.
  """
  features: int
  use_bias: bool = True
  dtype: str = "float32"
  kernel_init: nn.initializers.Initializer = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    flat = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    out = jnp.einsum("mk,kn->mn", flat, kernel.astype(self.dtype),
                     preferred_element_type=jnp.float32).reshape(*x.shape[:-1], self.features)
    if self.use_bias:
      out = out + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return out.astype(self.dtype)


def dense(features: int, dtype, name: str, use_bias: bool = True,
          kernel_init=trunc_normal(0.02)) -> Dense:
  """Linear layer with SparseFormer's default init (trunc-normal std .02, zero bias)."""
  return Dense(features, use_bias, dtype, kernel_init, name=name)


def layer_norm(eps: float, dtype, name: str, width: int = 0) -> nn.LayerNorm:
  """LayerNorm; `width` > 0 starts its scale at 1/sqrt(width) (the official 'unit norm' init)."""
  scale_init = nn.initializers.constant(1.0 / math.sqrt(width)) if width else nn.initializers.ones
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, scale_init=scale_init,
                      use_fast_variance=False, name=name)


def _through_conditional(g):
  """g, passed through a conditional: a boundary XLA:CPU's fusion cannot cross. The branches
  differ (g + 0.0 only ever runs when g starts with a NaN) so that XLA cannot merge them."""
  first = g.reshape(-1)[0]
  return jax.lax.cond(jnp.isnan(first), lambda g: g + 0.0, lambda g: g, g)


@jax.custom_vjp
def materialize_gradient(x):
  """Identity whose gradient XLA:CPU computes once, into a buffer, instead of inside each of its
  consumers.

  A residual stream's gradient is a chain of sums, one per block. XLA:CPU fuses such cheap
  elementwise chains into every consumer, so each block's backward re-reads the gradients of all
  the blocks above it: work quadratic in depth (fusions of 140 operands, 4% of an SF-T training
  step). It drops optimization barriers before fusing, but not conditionals. Other backends
  materialize these sums anyway; there the gradient passes unchanged.
  """
  return x


def _materialize_gradient_fwd(x):
  return x, None


def _materialize_gradient_bwd(_, g):
  return (jax.lax.platform_dependent(g, cpu=_through_conditional, default=lambda g: g),)


materialize_gradient.defvjp(_materialize_gradient_fwd, _materialize_gradient_bwd)


def _transposed(x):
  """x with its last two axes swapped, in a buffer of its own: the optimization barrier keeps
  XLA from folding the transpose back into the matmul that reads it."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _rhs_gradient_cpu(a, g):
  """a^T @ g as a matmul of row-major operands."""
  return einsum("...km,...mn->...kn", _transposed(a), g)


@jax.custom_vjp
def matmul(a, b):
  """Batched a @ b: (..., M, K) @ (..., K, N) -> (..., M, N), differentiated into fast matmuls.

  The gradient for b, a^T @ g, contracts a over its rows. XLA:CPU runs such a matmul in Eigen,
  at 4-40 GFLOP/s for the small batched shapes of attention heads and adaptive mixing; from an
  explicit transposed copy (`_rhs_gradient_cpu`) it becomes a plain matmul that XLA:CPU gives to
  YNNPACK, as it does the forward. SF-T training on 2 CPU cores: +10% img/s. Other backends
  differentiate the plain product.
  """
  return einsum("...mk,...kn->...mn", a, b)


def _matmul_fwd(a, b):
  return matmul(a, b), (a, b)


def _matmul_bwd(residuals, g):
  a, b = residuals
  d_a = einsum("...mn,...kn->...mk", g, b)
  d_b = jax.lax.platform_dependent(
      a, g, cpu=_rhs_gradient_cpu, default=lambda a, g: einsum("...mk,...mn->...kn", a, g))
  return d_a, d_b


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def residual_add(module: nn.Module, x: jax.Array, h: jax.Array, rate: float, train: bool):
  """x + drop_path(h), the sum's gradient materialized once (see `materialize_gradient`)."""
  return materialize_gradient(x + drop_path(module, h, rate, train))


def drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Stochastic depth per sample: zeroes a whole sample's residual with probability `rate`.

  Draws from `module`'s 'dropout' PRNG stream, so randomness is explicit in `apply(rngs=...)`.
  Multiplies by a per-sample 0 or 1/keep, as timm's drop_path; a `where` over the whole array
  made XLA:CPU re-derive the random mask for every element (5% of a training step).
  """
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (mask / keep).astype(x.dtype)


def read_tokens(x: jax.Array, head: str) -> jax.Array:
  """The head's read-out of tokens (B, N, C) -> (B, C): their mean ('avg') or token 0 ('cls')."""
  return x.mean(axis=1) if head == "avg" else x[:, 0]


class Mlp(nn.Module):
  """Linear -> activation -> Linear."""
  hidden: int
  activation: str = "gelu"   # "gelu" | "quick_gelu"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, head: Optional[str] = None):
    """(B, N, C) -> (B, N, C); with `head`, (B, C): `read_tokens` of the output, taken before fc2
    (a per-token linear map, which the read-out commutes with), so that fc2 runs on B rows."""
    act = quick_gelu if self.activation == "quick_gelu" else gelu
    h = act(dense(self.hidden, self.dtype, "fc1")(x))
    if head:
      h = read_tokens(h, head)
    return dense(x.shape[-1], self.dtype, "fc2")(h)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (q, k, v stacked on the outputs).

  Laid out heads-major (B, H, N, hd), with the softmax normalization applied to the (N, hd)
  output instead of the (N, N) weights: with SparseFormer's many tiny heads this makes the
  forward pass ~3x faster on CPU than the textbook einsums, and the backward a little faster.
  q, k and v are three slices of the qkv output, so their gradients meet in one concatenation;
  split from a (3, B, H, N, hd) stack, they took three padded copies and two transposes (SF-T
  training on 2 CPU cores: +4.5% img/s).
  """
  num_heads: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    qkv = dense(3 * width, self.dtype, "qkv")(x)                         # (B, N, 3 width)
    q, k, v = (qkv[..., i * width:(i + 1) * width]
               .reshape(batch, tokens, self.num_heads, head_dim).transpose(0, 2, 1, 3)
               for i in range(3))                                          # (B, H, N, hd) each
    logits = matmul(q * head_dim ** -0.5, jnp.swapaxes(k, -1, -2)).astype(jnp.float32)
    # exp(logits - max) / sum: the max only guards exp against overflow and cancels out, so it
    # needs no gradient.
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = matmul(weights.astype(v.dtype), v)                              # (B, H, N, hd)
    out = out / weights.sum(axis=-1, keepdims=True).astype(out.dtype)     # (B, H, N, hd)
    out = out.transpose(0, 2, 1, 3).reshape(batch, tokens, width)
    return dense(width, self.dtype, "proj")(out)


def xavier_uniform_blocks(shapes):
  """Bias initializer: consecutive blocks each Xavier-uniform as a (fan_in, fan_out) matrix."""
  def init(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, len(shapes))
    parts = []
    for k, (fan_in, fan_out) in zip(keys, shapes):
      bound = math.sqrt(6.0 / (fan_in + fan_out))
      parts.append(jax.random.uniform(k, (fan_in * fan_out,), dtype, -bound, bound))
    out = jnp.concatenate(parts)
    assert out.shape == tuple(shape), (out.shape, shape)
    return out
  return init


kaiming_normal_fan_out = functools.partial(nn.initializers.variance_scaling, 2.0, "fan_out",
                                           "normal")
