"""The early convolution: conv 7x7/2 -> ReLU -> max-pool 3x3/2 -> per-pixel channel normalization.

Written for speed on CPU, where the stem costs a large share of a training step: the conv runs
as a 1-D conv over rows that carry their 7 input rows as channels (XLA:CPU's 2-D conv of a
3-channel image is 2x slower, its kernel gradient 5x), and the max-pool is elementwise maxima of
phase-wise slices (the gradient of XLA's reduce-window is a select-and-scatter, 3-4x slower).
Numbers match the official conv -> ReLU -> MaxPool2d.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparseformer_jax.models.layers import kaiming_normal_fan_out

KERNEL = 7  # the stem's conv kernel; smaller images cannot be read
STRIDE = 2


def _uniform_fan_in_bias(fan_in: int):
  """PyTorch's default conv bias init, uniform(+-1/sqrt(fan_in)), which the official code keeps."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def strided_conv(images, kernel, stride: int):
  """images (B, H, W, C) * kernel (k, k, C, O), padding k // 2 -> (B, ceil(H/s), ceil(W/s), O).

  Output row i reads padded input rows s*i .. s*i + k-1: stacked as channels, they turn the 2-D
  conv into a 1-D conv along W with k*C input channels, whose forward and kernel gradient
  XLA:CPU runs at matmul speed. The stack is k/s times the input; the result is the 2-D conv's.
  """
  size, pad = kernel.shape[0], kernel.shape[0] // 2
  batch, height, width, channels = images.shape
  out_h = (height + 2 * pad - size) // stride + 1
  padded = jnp.pad(images, ((0, 0), (pad, pad), (0, 0), (0, 0)))
  rows = jnp.stack([padded[:, i:i + stride * (out_h - 1) + 1:stride] for i in range(size)],
                   axis=3)                                             # (B, h, W, k, C)
  rows = rows.reshape(batch * out_h, width, size * channels)
  kernel = kernel.transpose(1, 0, 2, 3).reshape(size, size * channels, -1)   # (kx, ky*C, O)
  out = jax.lax.conv_general_dilated(rows, kernel, (stride,), ((pad, pad),),
                                     dimension_numbers=("NWC", "WIO", "NWC"))
  return out.reshape(batch, out_h, out.shape[1], out.shape[2])          # (B, h, w, O)


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


def max_pool_3x3_s2(x):
  """MaxPool2d(3, stride=2, padding=1) of (B, H, W, C): (B, ceil(H/2), ceil(W/2), C).

  Works on the four (row, column) parity phases of x, so that every shift, and every gradient,
  is of a quarter-size array (strided shifts of the full map made the backward pass 2.5x slower).
  """
  rows = [_max3(x[:, a::2, 0::2], x[:, a::2, 1::2], axis=2) for a in (0, 1)]
  return _max3(rows[0], rows[1], axis=1)


class StridedConv(nn.Module):
  """The 7x7/2 conv with bias (params 'kernel' (7, 7, C, O) and 'bias', as nn.Conv's)."""
  features: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", kaiming_normal_fan_out(),
                        (KERNEL, KERNEL, channels, self.features), jnp.float32)
    bias = self.param("bias", _uniform_fan_in_bias(KERNEL * KERNEL * channels), (self.features,),
                      jnp.float32)
    x = strided_conv(x.astype(self.dtype), kernel.astype(self.dtype), STRIDE)
    return x + bias.astype(self.dtype)


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
    x = nn.relu(max_pool_3x3_s2(x))
    x = x.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True, ddof=1 if self.unbiased_var else 0)
    x = (x - mean) / jnp.sqrt(var + self.eps)
    return x.reshape(*lead, *x.shape[1:])                                  # (B, [T,] h, w, C)
