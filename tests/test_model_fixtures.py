"""The model against reference outputs of the official PyTorch code (tests/fixtures)."""
import dataclasses
import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer_jax import (create_model, load_torch_checkpoint, load_torch_model,
                              token_intermediates)
from sparseformer_jax.weights.torch_checkpoint import (_to_numpy_state_dict, detect_layout,
                                                      to_flax, torch_key)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = dict(conv_dim=32, num_tokens=16, num_points=36, focusing_width=64, cortex_width=128,
            cortex_depth=3, num_classes=10, drop_path_rate=0.0)
INPUTS = ["square", "wide"]
LAYOUTS = ["imagenet", "library"]


@functools.lru_cache(maxsize=None)
def reference(name):
  with np.load(os.path.join(FIXTURES, f"sf_v1_tiny_reference_{name}.npz")) as z:
    return {k: z[k] for k in z.files}


@functools.lru_cache(maxsize=None)
def tiny_model(layout):
  return load_torch_model(os.path.join(FIXTURES, f"sf_v1_tiny_{layout}_format.pth"),
                          "sparseformer_v1_tiny", **TINY)


def nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", INPUTS)
def test_logits_match_official(layout, name):
  model, variables = tiny_model(layout)
  ref = reference(name)
  logits = model.apply(variables, nhwc(ref["image_nchw"]), train=False)
  np.testing.assert_allclose(logits, ref[f"logits_{layout}_format"], atol=1e-4, rtol=0)


def test_layouts_select_their_numerics_flavor():
  (imagenet, _), (library, _) = tiny_model("imagenet"), tiny_model("library")
  assert imagenet.config.flavor == "imagenet" and imagenet.config.grad_clamp
  assert library.config.flavor == "library" and not library.config.grad_clamp
  ref = reference("square")
  # The two official flavors really differ on the same weights (by ~0.03-0.05).
  assert np.abs(ref["logits_imagenet_format"] - ref["logits_library_format"]).max() > 1e-2


def test_create_model_and_the_loader_on_a_release_file_give_the_official_logits():
  """The default path: create_model (no flavor given) + load_torch_checkpoint on a file in the
  released (library) layout computes as the official library does."""
  model = create_model("sparseformer_v1_tiny", **TINY)
  variables = load_torch_checkpoint(os.path.join(FIXTURES, "sf_v1_tiny_library_format.pth"),
                                    "sparseformer_v1_tiny", **TINY)
  ref = reference("square")
  logits = model.apply(variables, nhwc(ref["image_nchw"]), train=False)
  np.testing.assert_allclose(logits, ref["logits_library_format"], atol=1e-4, rtol=0)
  assert create_model("sparseformer_v1_tiny", video=True).config.flavor == "library"


def test_a_run_from_official_weights_computes_in_their_numerics():
  """The ImageNet configs train in the training code's numerics; init_from=<variant> (a library
  release file) or an imagenet-layout .pth switches the model to the weights' own."""
  from configs import sparseformer_t  # pylint: disable=g-import-not-at-top
  from sparseformer_jax.trainer import train  # pylint: disable=g-import-not-at-top
  config = sparseformer_t.get_config("smoke")
  assert train._build_model(config, 10).config.flavor == "imagenet"
  config.init_from = "sparseformer_v1_tiny"
  assert (train._build_model(config, 10).config.flavor, train._build_model(config, 10).config
          .grad_clamp) == ("library", False)
  config.init_from = os.path.join(FIXTURES, "sf_v1_tiny_imagenet_format.pth")
  model = train._build_model(config, 10)
  assert (model.config.flavor, model.config.grad_clamp) == ("imagenet", True)


@pytest.mark.parametrize("name", INPUTS)
def test_stem_and_every_unit_match_official(name):
  model, variables = tiny_model("imagenet")
  ref = reference(name)
  out = token_intermediates(model, variables, nhwc(ref["image_nchw"]))
  np.testing.assert_allclose(out["features"], np.transpose(ref["stem_nchw"], (0, 2, 3, 1)),
                             atol=1e-4, rtol=0)
  assert [u["name"] for u in out["units"]] == ["focusing", "cortex/unit_0", "cortex/unit_1",
                                               "cortex/unit_2"]
  assert out["units"][0]["rois"].shape[0] == 4          # one entry per focusing repeat
  for unit, index in zip(out["units"], [0, 2, 3, 4]):   # index in the official `layers` list
    np.testing.assert_allclose(unit["rois"][-1], ref[f"unit{index}/roi"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(unit["embeddings"][-1], ref[f"unit{index}/embedding"],
                               atol=1e-3, rtol=1e-4)
  assert out["units"][0]["points"].shape == (4, 2, 16, 36, 2)
  assert "points" not in out["units"][2]                 # plain cortex units do not sample


@pytest.mark.parametrize("name", INPUTS)
def test_every_gradient_matches_official(name):
  """Gradients of sum(logits * R), clamp active: each within 1e-3 x the array's largest value."""
  model, variables = tiny_model("imagenet")
  ref = reference(name)

  def loss(params, image):
    return jnp.sum(model.apply({"params": params}, image, train=False) * ref["loss_weights"])

  grads, image_grad = jax.grad(loss, argnums=(0, 1))(variables["params"], nhwc(ref["image_nchw"]))
  checked = {"image"}
  expected = np.transpose(ref["grad/image_nchw"], (0, 2, 3, 1))
  np.testing.assert_allclose(image_grad, expected, atol=1e-3 * np.abs(expected).max(), rtol=0)
  for path, grad in flax.traverse_util.flatten_dict(grads).items():
    key = torch_key(model.config, "imagenet", path)
    expected = to_flax(path, ref[f"grad/{key}"])
    np.testing.assert_allclose(grad, expected, atol=1e-3 * np.abs(expected).max(), rtol=0,
                               err_msg=f"gradient of {key} ({'/'.join(path)})")
    checked.add(key)
  official = {k[len("grad/"):] for k in ref if k.startswith("grad/")} - {"image_nchw"}
  assert official <= checked, f"unchecked official gradients: {official - checked}"


def test_gradient_clamp_is_what_makes_gradients_match():
  """Without the clamp, the offset gradients are far off: the fixture really tests the clamp."""
  model, variables = tiny_model("imagenet")
  unclamped = model.clone(config=dataclasses.replace(model.config, grad_clamp=False))
  ref = reference("square")
  image = nhwc(ref["image_nchw"])

  def offset_bias_grad(m):
    loss = lambda p: jnp.sum(m.apply({"params": p}, image, train=False) * ref["loss_weights"])
    return jax.grad(loss)(variables["params"])["focusing"]["offsets"]["bias"]

  expected = ref["grad/layers.0.roi_offset_bias"]
  tol = 1e-3 * np.abs(expected).max()
  assert np.abs(offset_bias_grad(model) - expected).max() <= tol
  assert np.abs(offset_bias_grad(unclamped) - expected).max() > 10 * tol


def test_both_layouts_hold_the_same_weights():
  a = load_torch_checkpoint(os.path.join(FIXTURES, "sf_v1_tiny_imagenet_format.pth"),
                            "sparseformer_v1_tiny", **TINY)
  b = load_torch_checkpoint(os.path.join(FIXTURES, "sf_v1_tiny_library_format.pth"),
                            "sparseformer_v1_tiny", **TINY)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_loader_accepts_wrapped_in_memory_numpy_state_dicts():
  state = _to_numpy_state_dict(os.path.join(FIXTURES, "sf_v1_tiny_imagenet_format.pth"))
  assert detect_layout(state) == "imagenet"
  wrapped = {"model": {k: np.array(v) for k, v in state.items()}}
  variables = load_torch_checkpoint(wrapped, "sparseformer_v1_tiny", **TINY)
  assert variables["params"]["initial_roi"].shape == (16, 4)


def test_loader_lists_missing_unexpected_and_misshaped_keys():
  state = _to_numpy_state_dict(os.path.join(FIXTURES, "sf_v1_tiny_library_format.pth"))
  del state["layers.0.mlp.fc1.bias"]
  state["layers.0.extra"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as err:
    load_torch_checkpoint(state, "sparseformer_v1_tiny", **{**TINY, "num_classes": 7})
  message = str(err.value)
  assert "missing" in message and "layers.0.mlp.fc1.bias" in message
  assert "unexpected" in message and "layers.0.extra" in message
  assert "mis-shaped" in message and "proj.weight" in message


def test_loader_rejects_foreign_state_dicts():
  with pytest.raises(ValueError, match="Not an official SparseFormer"):
    load_torch_checkpoint({"conv.weight": np.zeros((1,))}, "sparseformer_v1_tiny")
