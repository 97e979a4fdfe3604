"""The stem's strided convolution: the plain 2-D convolution, and beside it the XLA:CPU version
(a 1-D convolution over stacked rows, differentiated as a matmul over gathered patches) that a
CPU trace takes instead (`selection.use_cpu_workarounds`; figures in docs/performance.md)."""
import functools

import jax
import jax.numpy as jnp

from sparseformer_jax.ops.selection import use_cpu_workarounds


def conv(images, kernel, stride: int):
  """images (B, H, W, C) * kernel (k, k, C, O), padding k // 2 -> (B, ceil(H/s), ceil(W/s), O),
  in the images' dtype (float32 on the CPU, see `_row_stacked_conv`)."""
  if use_cpu_workarounds():
    return _conv_with_patch_gradient(images, kernel, stride)
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(images, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _row_stacked_conv(images, kernel, stride: int):
  """XLA:CPU: `conv` as a 1-D conv along W over rows that carry their k input rows as channels
  (k*C of them), whose forward and kernel gradient XLA:CPU runs at matmul speed (its 2-D conv of
  a 3-channel image is 2x slower, the kernel gradient 5x). The stack is k/s times the input. The
  result is float32, which XLA:CPU's bfloat16 units need (see `linear._einsum_f32`)."""
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
  window's left edge. One gather of contiguous runs (run * C floats), 2-3x faster on XLA:CPU
  than its concatenation of C-float pieces."""
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
  """`conv` as (B*h*w, k*run*C) patches @ the kernel zero-padded to `run` columns; returns the
  output and the patches (B*h*w, k*run*C)."""
  size = kernel.shape[0]
  patches = _patches(images, size, stride, _run(size))                  # (B, h, w, k, run, C)
  flat = patches.reshape(-1, patches[0, 0, 0].size)
  padded = jnp.pad(kernel, ((0, 0), (0, _run(size) - size), (0, 0), (0, 0)))
  out = jnp.einsum("mk,kn->mn", flat, padded.reshape(flat.shape[1], -1),
                   preferred_element_type=jnp.float32)                   # (B*h*w, O)
  return out.reshape(*patches.shape[:3], -1), flat


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_with_patch_gradient(images, kernel, stride: int):
  """XLA:CPU: `_row_stacked_conv`, differentiated as a matmul over gathered patches, which also
  gives the kernel gradient as one matmul (XLA:CPU spends most of its kernel-gradient conv in
  transposes). Undifferentiated (inference) it needs no patch array."""
  return _row_stacked_conv(images, kernel, stride)


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
  _, images_vjp = jax.vjp(lambda x: _row_stacked_conv(x, kernel, stride), images)
  return images_vjp(grad)[0], d_kernel


_conv_with_patch_gradient.defvjp(_patch_conv_fwd, _patch_conv_bwd)
