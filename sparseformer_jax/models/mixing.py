"""Adaptive mixing: every token decodes its own sampled points with channel and point mixing
matrices generated from its embedding (docs/model.md §3)."""
import flax.linen as nn

from sparseformer_jax import ops
from sparseformer_jax.models.layers import (dense, gelu, layer_norm, trunc_normal,
                                            xavier_uniform_blocks)


class SplitDense(nn.Module):
  """A Dense layer (params 'kernel', 'bias') whose outputs come as separate blocks of
  `features` (`ops.split_dense`)."""
  features: tuple
  dtype: str = "float32"
  kernel_init: nn.initializers.Initializer = trunc_normal(0.02)
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    """(M, K) -> a list of (M, size) arrays in `dtype`."""
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], sum(self.features)))
    bias = self.param("bias", self.bias_init, (sum(self.features),))
    return ops.split_dense(x.astype(self.dtype), kernel, bias, self.features)


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

    # The betas are added in float32, before GELU.
    h = ops.matmul(sampled, channel_mix)                                 # (B*N, P, C)
    if self.use_bias:
      h = gelu(h + self.param("m_beta", nn.initializers.zeros, (channels,))).astype(self.dtype)
    h = ops.matmul(point_mix, h)                                         # (B*N, Po, C)
    if self.use_bias:
      h = h + self.param("s_beta", nn.initializers.zeros, (self.out_points,))[:, None]
    h = gelu(h).astype(self.dtype)
    return dense(width, self.dtype, "out_proj")(h.reshape(batch, tokens, self.out_points * channels))
