"""The ops the model is written with: on the CPU their XLA:CPU versions, which must compute what
the plain versions (those GPU/TPU run, or `cpu_workarounds(False)`) compute, values and
gradients; and the structure that makes the XLA:CPU versions fast."""
import dataclasses
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer_jax import create_model, load_torch_model, ops
from sparseformer_jax.models import mixing as mixing_lib

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's op versions")

SMALL = dict(conv_dim=16, num_tokens=9, num_points=4, focusing_width=64, cortex_width=64,
             cortex_depth=2, num_classes=5, num_heads=4)


def both_ways(fn, *args):
  """fn's value and its gradients for a fixed random cotangent, traced with the XLA:CPU op
  versions and with the plain ones: [(value, grads), (value, grads)]."""
  results = []
  for workarounds in (True, False):
    with ops.cpu_workarounds(workarounds):
      assert ops.use_cpu_workarounds() == workarounds
      out, vjp = jax.vjp(jax.jit(lambda *a: fn(*a)), *args)
      g = jax.random.normal(jax.random.key(9), out.shape, out.dtype)
      results.append((out, jax.jit(vjp)(g)))
  return results


def assert_same(results, rtol=1e-5, atol=1e-5):
  (out, grads), (plain_out, plain_grads) = results
  np.testing.assert_allclose(out, plain_out, rtol=rtol, atol=atol)
  for got, want in zip(grads, plain_grads):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, np.abs(want).max()))


def normal(*shapes):
  keys = jax.random.split(jax.random.key(0), len(shapes))
  return [jax.random.normal(k, s) for k, s in zip(keys, shapes)]


# (a shape, b shape): adaptive mixing's channel mixing, an attention head's weights @ values.
MATMUL_SHAPES = [((3, 2, 36, 96), (3, 2, 96, 96)), ((3, 2, 49, 49), (3, 2, 49, 8))]


@pytest.mark.parametrize("a_shape, b_shape", MATMUL_SHAPES)
def test_matmul_equals_the_plain_product(a_shape, b_shape):
  assert_same(both_ways(ops.matmul, *normal(a_shape, b_shape)), atol=1e-4)


def test_dense_split_dense_and_add_equal_their_plain_versions():
  x, kernel, bias, y = normal((2, 3, 5), (5, 10), (10,), (2, 3, 10))
  assert_same(both_ways(ops.dense, x, kernel, bias))
  assert_same(both_ways(lambda x, k, b: jnp.concatenate(ops.split_dense(x, k, b, (6, 4)), -1),
                        x.reshape(6, 5), kernel, bias))
  assert_same(both_ways(lambda x, y: jnp.sin(ops.add(x, y)), y, y * 2))


@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (2, 17, 23, 3), (1, 7, 9, 3)])
def test_stem_conv_and_pool_equal_xla_conv_and_reduce_window(shape):
  """The row-stacked 1-D conv (differentiated as a matmul over gathered patches) and the
  phase-wise max-pool compute the plain 7x7/2 conv and MaxPool2d(3, 2, 1), values and
  gradients, on even and odd sizes."""
  images, kernel = normal(shape, (7, 7, 3, 8))
  stem = lambda images, kernel: ops.max_pool(ops.conv(images, kernel, 2))
  assert_same(both_ways(stem, images, kernel), rtol=1e-4, atol=1e-4)
  with ops.cpu_workarounds(True):   # undifferentiated: the 1-D conv without patches
    np.testing.assert_allclose(jax.jit(stem)(images, kernel), both_ways(stem, images, kernel)[1][0],
                               rtol=1e-5, atol=1e-4)


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
V1 = dict(conv_dim=32, num_tokens=16, num_points=36, focusing_width=64, cortex_width=128,
          cortex_depth=3, num_classes=10)
FIXTURE_MODELS = {   # official tiny checkpoints: (file, variant, fields, input shape)
    "v1_imagenet": ("sf_v1_tiny_imagenet_format.pth", "sparseformer_v1_tiny", V1, (2, 48, 40, 3)),
    "btsp": ("sf_btsp_tiny_library_format.pth", "sparseformer_btsp_openai_clip_base",
             dict(conv_dim=32, num_tokens=15, num_points=16, focusing_width=64, cortex_width=128,
                  cortex_depth=3, num_classes=8, generator_hidden=32), (2, 40, 48, 3)),
    "video_r2": ("sf_v1_tiny_video_r2_library_format.pth", "sparseformer_v1_tiny",
                 dict(V1, video=True, replicates=2, grad_clamp=False), (1, 4, 32, 40, 3)),
}


@pytest.mark.parametrize("fixture", sorted(FIXTURE_MODELS))
def test_the_official_fixtures_give_the_same_logits_and_gradients_both_ways(fixture):
  file, name, fields, shape = FIXTURE_MODELS[fixture]
  model, variables = load_torch_model(os.path.join(FIXTURES, file), name, **fields)
  images = jax.random.normal(jax.random.key(1), shape)
  model = model.clone(config=dataclasses.replace(model.config, drop_path_rate=0.3))

  def loss(params):
    logits = model.apply({"params": params}, images, train=True,
                         rngs={"dropout": jax.random.key(2)})
    return jnp.sum(jnp.sin(logits)), logits
  results = []
  for workarounds in (True, False):
    with ops.cpu_workarounds(workarounds):
      results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"]))
  ((_, logits), grads), ((_, plain_logits), plain_grads) = results
  np.testing.assert_allclose(logits, plain_logits, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(plain_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())))


def _widest_backward_fusion(cortex_depth: int) -> int:
  """Most operands of any fusion XLA:CPU compiles into a training gradient of the small model."""
  model = create_model("sparseformer_v1_tiny", **{**SMALL, "cortex_depth": cortex_depth})
  images = jnp.zeros((2, 32, 32, 3))
  params = model.init(jax.random.key(0), images)["params"]
  loss = lambda p: model.apply({"params": p}, images, train=True,
                               rngs={"dropout": jax.random.key(1)}).sum()
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  return max(m.group(1).count("%") for m in re.finditer(r" fusion\((.*?)\), kind", entry))


def test_residual_gradient_is_computed_once_per_block_not_per_consumer():
  # Fused into every consumer, the residual stream's gradient chain made the widest backward
  # fusion grow with depth (170 operands at 2 cortex units, 254 at 8): quadratic work.
  assert _widest_backward_fusion(8) <= _widest_backward_fusion(2)


def test_the_residual_gradient_conditional_passes_a_nan_gradient_unchanged():
  # The conditional's other branch (a gradient starting with NaN) passes it unchanged too.
  x = jnp.array([-1.0, 4.0, 9.0])
  g = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sqrt(ops.add(x, 0.0 * x)))))(x)
  assert np.isnan(g[0])
  np.testing.assert_allclose(g[1:], [0.25, 1 / 6], rtol=1e-6)


def test_split_dense_kernel_gradient_needs_no_padding():
  split = mixing_lib.SplitDense((6, 4), bias_init=nn.initializers.normal(1.0))
  x = jax.random.normal(jax.random.key(0), (6, 5))
  params = split.init(jax.random.key(1), x)
  loss = lambda p: jnp.sum(jnp.concatenate(split.apply(p, x), axis=-1) ** 2)
  # The blocks' gradients meet in one concatenation, not in zero-padded copies that are summed.
  assert "pad" not in jax.jit(jax.grad(loss)).lower(params).as_text()


def _dots_contracting_lhs_rows(a_shape, b_shape) -> int:
  """Dots in XLA:CPU's compiled gradient of ops.matmul that contract their lhs over a non-minor
  axis (matmuls of a transposed operand, which XLA:CPU runs in Eigen, not YNNPACK)."""
  loss = lambda a, b: jnp.sum(jnp.tanh(ops.matmul(a, b)))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
      jnp.ones(a_shape), jnp.ones(b_shape)).compile().as_text()
  count = 0
  for line in re.findall(r" dot\(.*", hlo):
    batch = re.search(r"lhs_batch_dims=\{([\d,]*)\}", line)
    rank = (len(batch.group(1).split(",")) if batch else 0) + 2   # batch, free, contracting
    count += int(re.search(r"lhs_contracting_dims=\{(\d+)\}", line).group(1)) != rank - 1
  return count


@pytest.mark.parametrize("a_shape, b_shape", MATMUL_SHAPES)
def test_matmul_gradient_has_no_transposed_lhs_dots_on_cpu(a_shape, b_shape):
  with ops.cpu_workarounds(False):
    assert _dots_contracting_lhs_rows(a_shape, b_shape) > 0   # what the check catches
  assert _dots_contracting_lhs_rows(a_shape, b_shape) == 0
