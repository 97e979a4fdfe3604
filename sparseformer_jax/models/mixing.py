"""Adaptive mixing: every token decodes its own sampled points with channel and point mixing
matrices generated from its embedding (SPEC §3.3)."""
import itertools

import flax.linen as nn
import jax.numpy as jnp

from sparseformer_jax.models.layers import (dense, einsum, gelu, layer_norm, matmul, trunc_normal,
                                            xavier_uniform_blocks)


class SplitDense(nn.Module):
  """A Dense layer (params 'kernel', 'bias') whose outputs come as separate blocks of
  `features`: each block is its own matmul with a slice of the kernel, so that no large output
  is written once and then copied into its parts. The bias is added inside the matmul, as an
  extra kernel row met by a column of ones in x: the outputs are the mixing matrices, big
  enough that a separate bias pass over them cost 3% of SF-T's inference on XLA:CPU. The kernel
  is cut with one split, whose gradient is one concatenation of the blocks' gradients (sliced,
  each block's gradient was padded to the full kernel and the pads summed: SF-T training on 2
  CPU cores, +1-2%)."""
  features: tuple
  dtype: str = "float32"
  kernel_init: nn.initializers.Initializer = trunc_normal(0.02)
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], sum(self.features)))
    bias = self.param("bias", self.bias_init, (sum(self.features),))
    flat = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    flat = jnp.concatenate([flat, jnp.ones((flat.shape[0], 1), flat.dtype)], axis=1)
    kernel = jnp.concatenate([kernel, bias[None]], axis=0).astype(self.dtype)  # (in + 1, out)
    blocks = jnp.split(kernel, list(itertools.accumulate(self.features))[:-1], axis=1)
    return [einsum("mk,kn->mn", flat, block).reshape(*x.shape[:-1], block.shape[1])
            for block in blocks]


class AdaptiveMixing(nn.Module):
  """(B, N, P, C) sampled features + (B, N, width) tokens -> (B, N, width) update.

  theta = Linear2(Linear1(LN(x))) (no activation between) gives per token M (C, C) and
  S (P_out, P); h = GELU(sampled @ M + m_beta); h = GELU(S @ h + s_beta); Linear(P_out*C -> width).
  Without biases (btsp): h = GELU(S @ (sampled @ M)).
  """
  out_points: int
  hidden: int
  ln_eps: float
  use_bias: bool = True
  dtype: str = "float32"

  @nn.compact
  def __call__(self, sampled, x):
    batch, tokens, points, channels = sampled.shape
    width = x.shape[-1]
    c2, pp = channels * channels, self.out_points * points
    theta = layer_norm(self.ln_eps, self.dtype, "norm", width=width)(x)
    theta = dense(self.hidden, self.dtype, "fc1")(theta)
    channel_mix, point_mix = SplitDense(
        (c2, pp), self.dtype, kernel_init=nn.initializers.zeros,
        bias_init=xavier_uniform_blocks([(channels, channels), (points, self.out_points)]),
        name="fc2")(theta.reshape(batch * tokens, -1))
    channel_mix = channel_mix.reshape(-1, channels, channels)            # (B*N, C, C)
    point_mix = point_mix.reshape(-1, self.out_points, points)           # (B*N, Po, P)
    sampled = sampled.reshape(-1, points, channels).astype(channel_mix.dtype)

    # The biases are added in float32, so that their gradients are float32 sums (XLA:CPU runs
    # bfloat16 ones 10x slower).
    h = matmul(sampled, channel_mix)                                     # (B*N, P, C)
    if self.use_bias:
      h = gelu(h + self.param("m_beta", nn.initializers.zeros, (channels,))).astype(self.dtype)
    h = matmul(point_mix, h)                                             # (B*N, Po, C)
    if self.use_bias:
      h = h + self.param("s_beta", nn.initializers.zeros, (self.out_points,))[:, None]
    h = gelu(h).astype(self.dtype)
    return dense(width, self.dtype, "out_proj")(h.reshape(batch, tokens, self.out_points * channels))
