"""The early convolution: conv 7x7/2 -> ReLU -> max-pool 3x3/2 -> per-pixel channel normalization.

Written for speed on CPU, where the stem costs a large share of a training step: the conv runs
as a 1-D conv over rows that carry their 7 input rows as channels (XLA:CPU's 2-D conv of a
3-channel image is 2x slower, its kernel gradient 5x); when differentiated on CPU it runs as one
matmul over gathered patches, which also give its kernel gradient as one matmul; and the
max-pool is elementwise maxima of phase-wise slices (the gradient of XLA's reduce-window is a
select-and-scatter, 3-4x slower). Numbers match the official conv -> ReLU -> MaxPool2d.
"""
import functools
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
  """images (B, H, W, C) * kernel (k, k, C, O), padding k // 2 -> (B, ceil(H/s), ceil(W/s), O),
  summed and returned in float32.

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
                                     dimension_numbers=("NWC", "WIO", "NWC"),
                                     preferred_element_type=jnp.float32)
  return out.reshape(batch, out_h, out.shape[1], out.shape[2])          # (B, h, w, O)


def _patches(images, size: int, stride: int, run: int):
  """images (B, H, W, C) -> (B, h, w, size, run, C), padding size // 2: for every output pixel,
  its `size` input rows, each a run of `run` >= size contiguous input columns starting at the
  window's left edge. One gather whose slices are contiguous runs (run * C floats; with C = 3 and
  run = 8 they are 96 bytes), 2-3x faster on CPU than XLA's concatenation of 3-float pieces."""
  batch, height, width, channels = images.shape
  pad = size // 2
  out_h = (height + 2 * pad - size) // stride + 1
  out_w = (width + 2 * pad - size) // stride + 1
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad + run - size), (0, 0)))
  rows = stride * jnp.arange(out_h)[:, None, None] + jnp.arange(size)[None, None, :]   # (h, 1, k)
  cols = stride * jnp.arange(out_w)[None, :, None]                                       # (1, w, 1)
  starts = jnp.stack(jnp.broadcast_arrays(rows, cols), axis=-1)                         # (h, w, k, 2)
  dims = jax.lax.GatherDimensionNumbers(offset_dims=(0, 4, 5), collapsed_slice_dims=(1,),
                                        start_index_map=(1, 2))
  return jax.lax.gather(padded, starts, dims, (batch, 1, run, channels),
                        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _run(size: int) -> int:
  """Columns per patch row: the kernel width rounded up to even (7 -> 8: 96-byte runs at C = 3)."""
  return size + size % 2


def _patch_matmul(images, kernel, stride: int):
  """strided_conv as (B*h*w, k*run*C) patches @ the kernel zero-padded to `run` columns; returns
  the output and the patches (B*h*w, k*run*C)."""
  size = kernel.shape[0]
  patches = _patches(images, size, stride, _run(size))                  # (B, h, w, k, run, C)
  flat = patches.reshape(-1, patches[0, 0, 0].size)
  padded = jnp.pad(kernel, ((0, 0), (0, _run(size) - size), (0, 0), (0, 0)))
  out = jnp.einsum("mk,kn->mn", flat, padded.reshape(flat.shape[1], -1),
                   preferred_element_type=jnp.float32)                   # (B*h*w, O)
  return out.reshape(*patches.shape[:3], -1), flat


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_with_patch_gradient(images, kernel, stride: int):
  """strided_conv, differentiated as a matmul over gathered patches: on CPU one training step's
  stem conv forward + kernel gradient takes 0.30 s instead of 0.52 s (SF-T, batch 32, one core),
  which otherwise spends most of its time in XLA's transposes around the kernel-gradient conv.
  Undifferentiated (inference) it is strided_conv, which needs no patch array."""
  return strided_conv(images, kernel, stride)


def _patch_conv_fwd(images, kernel, stride):
  out, flat = _patch_matmul(images, kernel, stride)
  return out, (images, kernel, flat)


def _patch_conv_bwd(stride, residuals, grad):
  images, kernel, flat = residuals
  size, out_channels = kernel.shape[0], kernel.shape[-1]
  # The kernel gradient: patches^T @ grad, without the zero-padded columns.
  d_kernel = jnp.einsum("mk,mn->kn", flat, grad.reshape(-1, out_channels),
                        preferred_element_type=jnp.float32).astype(kernel.dtype)  # (k*run*C, O)
  d_kernel = d_kernel.reshape(size, _run(size), -1, out_channels)[:, :size]
  # The images' gradient, which XLA drops when nothing uses it (training).
  _, images_vjp = jax.vjp(lambda x: strided_conv(x, kernel, stride), images)
  return images_vjp(grad)[0], d_kernel


conv_with_patch_gradient.defvjp(_patch_conv_fwd, _patch_conv_bwd)


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
  """The 7x7/2 conv with bias (params 'kernel' (7, 7, C, O) and 'bias', as nn.Conv's), in the
  compute dtype with a float32 result: the pool and the normalization after it run in float32
  (in bfloat16, XLA:CPU ran the pool's gradient 10x slower; SF-T bfloat16 training on 2 CPU
  cores: 6.7 -> 7.8 img/s)."""
  features: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", kaiming_normal_fan_out(),
                        (KERNEL, KERNEL, channels, self.features), jnp.float32)
    bias = self.param("bias", _uniform_fan_in_bias(KERNEL * KERNEL * channels), (self.features,),
                      jnp.float32)
    # Patches pay off where XLA's kernel-gradient conv is slow (CPU); cuDNN and TPU convolve well.
    conv = conv_with_patch_gradient if jax.default_backend() == "cpu" else strided_conv
    x = conv(x.astype(self.dtype), kernel.astype(self.dtype), STRIDE)
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
    x = nn.relu(max_pool_3x3_s2(x))
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True, ddof=1 if self.unbiased_var else 0)
    x = (x - mean) / jnp.sqrt(var + self.eps)
    return x.reshape(*lead, *x.shape[1:])                                  # (B, [T,] h, w, C)
