"""The early convolution: conv 7x7/2 -> ReLU -> max-pool 3x3/2 -> per-pixel channel normalization
(docs/model.md §1), as the official conv -> ReLU -> MaxPool2d -> normalization.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparseformer_jax import ops
from sparseformer_jax.models.layers import kaiming_normal_fan_out

KERNEL = 7  # the stem's conv kernel; smaller images cannot be read
STRIDE = 2


def _uniform_fan_in_bias(fan_in: int):
  """PyTorch's default conv bias init, uniform(+-1/sqrt(fan_in)), which the official code keeps."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class StridedConv(nn.Module):
  """The 7x7/2 conv with bias (params 'kernel' (7, 7, C, O) and 'bias', as nn.Conv's), in the
  compute dtype with a float32 result: the pool and the normalization after it run in float32."""
  features: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", kaiming_normal_fan_out(),
                        (KERNEL, KERNEL, channels, self.features), jnp.float32)
    bias = self.param("bias", _uniform_fan_in_bias(KERNEL * KERNEL * channels), (self.features,),
                      jnp.float32)
    x = ops.conv(x.astype(self.dtype), kernel.astype(self.dtype), STRIDE)
    return x + bias


class Stem(nn.Module):
  """Maps images (B, H, W, 3) to a stride-4 feature map (B, H/4, W/4, C), or, frame by frame
  (a 1x7x7 conv and 1x3x3 pool), videos (B, T, H, W, 3) to (B, T, H/4, W/4, C).

  The output is normalized over channels per pixel, without affine parameters, in float32:
  `(x - mean) / sqrt(var + eps)` with the unbiased (imagenet codebase) or biased (library) var.
  """
  conv_dim: int
  unbiased_var: bool
  eps: float
  dtype: str = "float32"

  @nn.compact
  def __call__(self, images):
    lead, (height, width, channels) = images.shape[:-3], images.shape[-3:]
    x = images.reshape(-1, height, width, channels)                        # (B[*T], H, W, 3)
    x = StridedConv(self.conv_dim, self.dtype, name="conv")(x)
    # max-pool then ReLU == ReLU then max-pool, on a quarter of the elements.
    x = nn.relu(ops.max_pool(x))
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True, ddof=1 if self.unbiased_var else 0)
    x = (x - mean) / jnp.sqrt(var + self.eps)
    return x.reshape(*lead, *x.shape[1:])                                  # (B, [T,] h, w, C)
