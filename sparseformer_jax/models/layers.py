"""Transformer building blocks shared by the SparseFormer units: Dense/LayerNorm with the official
initialization, exact GELU, QuickGELU, per-sample drop path, the residual add, MLP and multi-head
self-attention."""
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparseformer_jax import ops

trunc_normal = nn.initializers.truncated_normal
gelu = ops.gelu   # exact GELU, as PyTorch's nn.GELU (flax's default is the tanh approximation)


def quick_gelu(x):
  """CLIP's QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


class Dense(nn.Module):
  """nn.Dense's params ('kernel' (K, F), 'bias' (F,), float32): x @ kernel in `dtype`, which gets
  the float32 bias before it is rounded to `dtype` (`ops.dense`)."""
  features: int
  use_bias: bool = True
  dtype: str = "float32"
  kernel_init: nn.initializers.Initializer = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias else None)
    return ops.dense(x.astype(self.dtype), kernel.astype(self.dtype), bias)


def dense(features: int, dtype, name: str, use_bias: bool = True,
          kernel_init=trunc_normal(0.02)) -> Dense:
  """Linear layer with SparseFormer's default init (trunc-normal std .02, zero bias)."""
  return Dense(features, use_bias, dtype, kernel_init, name=name)


def layer_norm(eps: float, dtype, name: str, width: int = 0) -> nn.LayerNorm:
  """LayerNorm; `width` > 0 starts its scale at 1/sqrt(width) (the official 'unit norm' init)."""
  scale_init = nn.initializers.constant(1.0 / math.sqrt(width)) if width else nn.initializers.ones
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, scale_init=scale_init,
                      use_fast_variance=False, name=name)


def residual_add(module: nn.Module, x: jax.Array, h: jax.Array, rate: float, train: bool):
  """x + drop_path(h): a residual connection (`ops.add`)."""
  return ops.add(x, drop_path(module, h, rate, train))


def drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Stochastic depth per sample: zeroes a whole sample's residual with probability `rate`.

  Draws from `module`'s 'dropout' PRNG stream, so randomness is explicit in `apply(rngs=...)`.
  Multiplies by a per-sample 0 or 1/keep, as timm's drop_path.
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

  Laid out heads-major (B, H, N, hd). The softmax's normalization divides the (N, hd) output
  instead of the (N, N) weights, which with SparseFormer's many tiny heads is less work; q, k
  and v are three slices of the qkv output, so that their gradients meet in one concatenation.
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
    logits = ops.matmul(q * head_dim ** -0.5, jnp.swapaxes(k, -1, -2)).astype(jnp.float32)
    # exp(logits - max) / sum: the max only guards exp against overflow and cancels out, so it
    # needs no gradient.
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = ops.matmul(weights.astype(v.dtype), v)                          # (B, H, N, hd)
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
