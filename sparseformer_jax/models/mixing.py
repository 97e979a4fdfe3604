"""Adaptive mixing: every token decodes its own sampled points with channel and point mixing
matrices generated from its embedding (SPEC §3.3)."""
import flax.linen as nn
import jax.numpy as jnp

from sparseformer_jax.models.layers import dense, gelu, layer_norm, xavier_uniform_blocks


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
    theta = dense(c2 + pp, self.dtype, "fc2", kernel_init=nn.initializers.zeros,
                  bias_init=xavier_uniform_blocks([(channels, channels), (points, self.out_points)])
                  )(theta)                                               # (B, N, C*C + Po*P)
    channel_mix = theta[..., :c2].reshape(batch, tokens, channels, channels)
    point_mix = theta[..., c2:].reshape(batch, tokens, self.out_points, points)
    sampled = sampled.astype(theta.dtype)

    h = jnp.einsum("bnpc,bncd->bnpd", sampled, channel_mix)               # (B, N, P, C)
    if self.use_bias:
      h = gelu(h + self.param("m_beta", nn.initializers.zeros, (channels,)).astype(h.dtype))
    h = jnp.einsum("bnqp,bnpc->bnqc", point_mix, h)                       # (B, N, Po, C)
    if self.use_bias:
      h = h + self.param("s_beta", nn.initializers.zeros, (self.out_points,))[:, None].astype(h.dtype)
    h = gelu(h)
    return dense(width, self.dtype, "out_proj")(h.reshape(batch, tokens, self.out_points * channels))
