"""Transformer building blocks shared by the SparseFormer units: Dense/LayerNorm with the official
initialization, exact GELU, QuickGELU, per-sample drop path, MLP and multi-head self-attention."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

trunc_normal = nn.initializers.truncated_normal


def gelu(x):
  """Exact (erf) GELU, as PyTorch's nn.GELU; flax's default is the tanh approximation."""
  return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
  """CLIP's QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def dense(features: int, dtype, name: str, use_bias: bool = True,
          kernel_init=trunc_normal(0.02), **kwargs) -> nn.Dense:
  """Linear layer with SparseFormer's default init (trunc-normal std .02, zero bias)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=kernel_init, name=name, **kwargs)


def layer_norm(eps: float, dtype, name: str, width: int = 0) -> nn.LayerNorm:
  """LayerNorm; `width` > 0 starts its scale at 1/sqrt(width) (the official 'unit norm' init)."""
  scale_init = nn.initializers.constant(1.0 / math.sqrt(width)) if width else nn.initializers.ones
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, scale_init=scale_init,
                      use_fast_variance=False, name=name)


def drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Stochastic depth per sample: zeroes a whole sample's residual with probability `rate`.

  Draws from `module`'s 'dropout' PRNG stream, so randomness is explicit in `apply(rngs=...)`.
  """
  if not train or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Mlp(nn.Module):
  """Linear -> activation -> Linear."""
  hidden: int
  activation: str = "gelu"   # "gelu" | "quick_gelu"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    act = quick_gelu if self.activation == "quick_gelu" else gelu
    h = act(dense(self.hidden, self.dtype, "fc1")(x))
    return dense(x.shape[-1], self.dtype, "fc2")(h)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (q, k, v stacked on the outputs)."""
  num_heads: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    qkv = dense(3 * width, self.dtype, "qkv")(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)          # (B, N, 3, H, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim ** -0.5, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, width)
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
