"""Model construction, variants, sizes, costs, numerics options and input errors."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer_jax import VARIANTS, create_model, get_config, token_intermediates
from sparseformer_jax.models import roi as roi_lib

SMALL = dict(conv_dim=16, num_tokens=9, num_points=4, focusing_width=64, cortex_width=64,
             cortex_depth=2, num_classes=5, num_heads=4)


def count_params(name, **overrides):
  model = create_model(name, **overrides)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("name,millions", [
    ("sparseformer_v1_tiny", 31.52), ("sparseformer_v1_small", 47.58),
    ("sparseformer_v1_base", 81.08), ("sparseformer_btsp_augreg_base", 64.19),
    ("sparseformer_btsp_augreg_large", 212.43), ("sparseformer_btsp_openai_clip_base", 63.81),
    ("sparseformer_btsp_openai_clip_large", 212.19)])
def test_parameter_counts_match_official(name, millions):
  assert abs(count_params(name) / 1e6 - millions) <= 0.01


@pytest.mark.parametrize("name,gmacs", [("sparseformer_v1_tiny", 2.19),
                                        ("sparseformer_v1_small", 4.00),
                                        ("sparseformer_v1_base", 8.00)])
def test_forward_macs_at_224(name, gmacs):
  """XLA's compiled flop count / 2 within 5% of the paper's MACs with the mixing matmuls."""
  model = create_model(name)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  cost = jax.jit(lambda p, x: model.apply(p, x)).lower(params, images).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert abs(cost["flops"] / 2e9 / gmacs - 1) <= 0.05


def test_v1_variants_use_official_hyper_parameters():
  tiny, small, base = (get_config(f"sparseformer_v1_{s}") for s in ("tiny", "small", "base"))
  assert (tiny.num_tokens, small.num_tokens, base.num_tokens) == (49, 64, 81)
  assert (tiny.cortex_depth, small.cortex_depth, base.cortex_depth) == (8, 8, 10)
  assert (tiny.drop_path_rate, small.drop_path_rate, base.drop_path_rate) == (0.2, 0.3, 0.4)
  assert all(c.num_points == 36 and c.conv_dim == 96 and c.heads(c.cortex_width) == 64
             for c in (tiny, small, base))
  assert get_config("sparseformer_btsp_augreg_base").heads(768) == 12


def test_unknown_names_and_fields_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown model 'sparseformer_v9'.*sparseformer_v1_tiny"):
    create_model("sparseformer_v9")
  with pytest.raises(ValueError, match="Unknown model field.*num_tokns"):
    create_model("sparseformer_v1_tiny", num_tokns=3)
  with pytest.raises(ValueError, match="padding"):
    create_model("sparseformer_v1_tiny", padding="reflect")


@pytest.fixture(scope="module")
def small_model():
  model = create_model("sparseformer_v1_tiny", **SMALL)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return model, variables


@pytest.mark.parametrize("shape,message", [
    ((32, 32, 3), "rank 3"), ((1, 3, 32, 32), "3 channels"), ((1, 5, 40, 3), "too small")])
def test_bad_inputs_raise_value_errors(small_model, shape, message):
  model, variables = small_model
  with pytest.raises(ValueError, match=message):
    model.apply(variables, jnp.zeros(shape))


def test_any_resolution_and_aspect_ratio(small_model):
  model, variables = small_model
  for shape in [(2, 32, 32, 3), (1, 40, 96, 3), (1, 97, 33, 3)]:
    logits = model.apply(variables, jnp.ones(shape))
    assert logits.shape == (shape[0], 5) and np.isfinite(logits).all()


def test_drop_path_is_per_sample_and_driven_by_explicit_rng(small_model):
  model, variables = small_model
  model = model.clone(config=get_config("sparseformer_v1_tiny", **SMALL, drop_path_rate=0.9))
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  run = lambda seed: model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(run(0), run(0))
  assert np.abs(run(0) - run(1)).max() > 1e-4
  np.testing.assert_array_equal(model.apply(variables, images), model.apply(variables, images))
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, images, train=True)


@pytest.mark.parametrize("overrides", [
    {}, {"head": "cls", "cls_insert_unit": 2},
    {"cortex_depth": 1, "cortex_leading_ops": ("sampling", "pe_inject")}])  # no 'mlp' last
def test_head_read_out_before_the_last_fc2_equals_reading_the_final_tokens(overrides):
  # Without intermediates, the last unit reads out the token mean / CLS token before its fc2;
  # collecting intermediates computes every final token. Values and gradients must agree.
  model = create_model("sparseformer_v1_tiny", **{**SMALL, "drop_path_rate": 0.5, **overrides})
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  params = model.init(jax.random.key(0), images)["params"]

  def loss(p, collect):
    out = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.key(2)},
                      mutable=["intermediates"] if collect else False)
    logits = out[0] if collect else out
    return jnp.sum(jnp.sin(logits)), logits

  (_, read_out), grads = jax.value_and_grad(loss, has_aux=True)(params, False)
  (_, tokens), token_grads = jax.value_and_grad(loss, has_aux=True)(params, True)
  np.testing.assert_allclose(read_out, tokens, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(token_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_rois(small_model):
  model, variables = small_model
  bf16 = model.clone(config=get_config("sparseformer_v1_tiny", **SMALL, dtype="bfloat16"))
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
      bf16.init(jax.random.key(0), images)))
  out = token_intermediates(bf16, variables, images)
  assert out["logits"].dtype == np.float32 and out["units"][0]["rois"].dtype == np.float32
  ref = model.apply(variables, images)
  np.testing.assert_allclose(out["logits"], ref, atol=0.1 * np.abs(ref).max())


def _equations(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _equations(sub)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the ops' XLA:CPU versions")
def test_bfloat16_compute_sums_in_float32_on_the_cpu(small_model):
  """On the CPU, with bfloat16 compute, every matmul and the stem conv of bfloat16 operands asks
  for a float32 result (the CPU's bfloat16 units need it), and the gradients of the Dense,
  mixing and stem biases and of the stem's pool are float32 sums (docs/performance.md, "bfloat16
  on the CPU"). tests/test_lowering.py checks the GPU/TPU programs."""
  model, variables = small_model
  bf16 = model.clone(config=get_config("sparseformer_v1_tiny", **SMALL, dtype="bfloat16"))
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  infer = jax.make_jaxpr(lambda v: bf16.apply(v, images))(variables)
  train = jax.make_jaxpr(jax.grad(lambda v: bf16.apply(
      v, images, train=True, rngs={"dropout": jax.random.key(0)}).sum()))(variables)
  for program, least in ((infer, 10), (train, 30)):
    low = [e for e in _equations(program.jaxpr)
           if e.primitive.name in ("dot_general", "conv_general_dilated")
           and all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    assert len(low) >= least
    assert all(e.params["preferred_element_type"] == jnp.float32 for e in low), [
        (e.primitive.name, [v.aval for v in e.invars]) for e in low
        if e.params["preferred_element_type"] != jnp.float32]
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in low)
  low_sums = [str(e.source_info.name_stack) for e in _equations(train.jaxpr)
              if e.primitive.name == "reduce_sum" and e.invars[0].aval.dtype == jnp.bfloat16]
  assert not [s for s in low_sums if re.search(r"stem|mixing|fc\d?$|qkv|proj|head|transition", s)]


def test_initial_rois_follow_the_official_grid():
  rois = roi_lib.initial_rois(10)
  np.testing.assert_allclose(rois[1], [0.0, 0.25, 0.5, 0.75])     # token i*r + j: y follows j
  np.testing.assert_allclose(rois[3], [0.25, 0.0, 0.75, 0.5])     # x follows the outer index
  np.testing.assert_allclose(rois[9], [0.0, 0.0, 1.0, 1.0])       # past r*r: the whole image
  np.testing.assert_allclose(roi_lib.initial_rois(1), [[0.0, 0.0, 1.0, 1.0]])
  video = roi_lib.initial_rois(4, dims=3, replicates=2)
  np.testing.assert_allclose(video[5], [0.0, 0.5, 0.5, 0.5, 1.0, 1.0])   # replica 1, token 1


def test_roi_adjust_moves_centres_and_scales_sizes():
  rois = jnp.array([[0.2, 0.2, 0.6, 0.4]])
  out = roi_lib.adjust_rois(rois, jnp.array([[0.5, 0.0, np.log(2.0), 0.0]]))
  np.testing.assert_allclose(out, [[0.2, 0.2, 1.0, 0.4]], atol=1e-6)


def test_intermediates_expose_rois_and_points_of_every_repeat(small_model):
  model, variables = small_model
  out = token_intermediates(model, variables, jnp.ones((2, 32, 32, 3)))
  focusing = out["units"][0]
  assert focusing["rois"].shape == (4, 2, 9, 4) and focusing["points"].shape == (4, 2, 9, 4, 2)
  assert out["features"].shape == (2, 8, 8, 16)
  # The first repeat's points sit inside its starting RoIs (the offset grid spans +-1/3 of it).
  first = focusing["points"][0]
  start = roi_lib.initial_rois(9)[None, :, None]
  assert ((first >= start[..., :2] - 1e-6) & (first <= start[..., 2:] + 1e-6)).all()


def test_every_variant_is_registered_with_normalization():
  from sparseformer_jax import NORMALIZATION
  assert set(NORMALIZATION) == set(VARIANTS)
  assert NORMALIZATION["sparseformer_btsp_openai_clip_base"][0][0] == pytest.approx(0.48145466)
