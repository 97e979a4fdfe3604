"""The bootstrapped SparseFormers (CVPR 2024, docs/model.md §6) against the official code and
configs."""
import dataclasses
import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer_jax import (NORMALIZATION, SparseFormer, create_model, inflate_from_image,
                              load_torch_checkpoint, load_torch_model, token_intermediates)
from sparseformer_jax.weights.inflate import video_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CHECKPOINT = os.path.join(FIXTURES, "sf_btsp_tiny_library_format.pth")
NAME = "sparseformer_btsp_openai_clip_base"
TINY = dict(conv_dim=32, num_tokens=15, num_points=16, focusing_width=64, cortex_width=128,
            cortex_depth=3, num_classes=8, generator_hidden=32)

# sparseformer/sparseformer/config.py: tokens, focusing -> cortex width, cortex units (the sampling
# unit + ViT blocks), projection size and bias, normalization (mean, std).
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OFFICIAL = {
    "sparseformer_btsp_augreg_base": (48, 384, 768, 1 + 8, 1000, True, INCEPTION),
    "sparseformer_btsp_augreg_large": (48, 512, 1024, 1 + 16, 1000, True, INCEPTION),
    "sparseformer_btsp_openai_clip_base": (48, 384, 768, 1 + 8, 512, False, CLIP),
    "sparseformer_btsp_openai_clip_large": (63, 512, 1024, 1 + 16, 768, False, CLIP),
}


@functools.lru_cache(maxsize=None)
def tiny_model():
  return load_torch_model(CHECKPOINT, NAME, **TINY)


@functools.lru_cache(maxsize=None)
def reference():
  with np.load(os.path.join(FIXTURES, "sf_btsp_tiny_reference.npz")) as z:
    return {k: z[k] for k in z.files}


def images():
  return jnp.asarray(np.transpose(reference()["image_nchw"], (0, 2, 3, 1)))   # (2, 80, 96, 3)


def run(params=None, **config):
  """token_intermediates of the fixture model on the fixture images, with params/config changed."""
  model, variables = tiny_model()
  model = model.clone(config=dataclasses.replace(model.config, **config))
  return token_intermediates(model, {"params": params or variables["params"]}, images())


def test_logits_match_official():
  model, variables = tiny_model()
  np.testing.assert_allclose(model.apply(variables, images()), reference()["logits"],
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_variants_have_the_official_structure(name):
  tokens, narrow, wide, depth, proj, bias, normalization = OFFICIAL[name]
  model = create_model(name)
  logits, variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  params, cfg = variables["params"], model.config
  assert logits.shape == (1, proj) and ("bias" in params["head"]) == bias
  assert params["initial_roi"].shape == (tokens, 4)
  assert params["initial_embedding"].shape == (1, narrow)                 # shared by all tokens
  assert params["focusing"]["stage_embedding"].shape == (4, narrow)       # one row per repeat
  assert params["focusing"]["roi_adjust"]["proj"]["kernel"].shape == (narrow, 4)
  assert "fc" in params["focusing"]["roi_adjust"]                         # the adjust is an MLP
  assert params["transition"]["kernel"].shape == (narrow, wide) and "transition_norm" not in params
  cortex = dict(params["cortex"])
  assert cortex.pop("cls_embedding").shape == (1, wide)
  assert sorted(cortex) == sorted(f"unit_{k}" for k in range(depth))
  assert set(cortex["unit_0"]) == {"offsets", "mixing", "pe_norm", "pe_proj"}
  assert all(set(cortex[f"unit_{k}"]) == {"attn_norm", "attn", "mlp_norm", "mlp"}
             for k in range(1, depth))
  assert "m_beta" not in params["focusing"]["mixing"]                     # mixing without biases
  assert params["focusing"]["mixing"]["fc1"]["kernel"].shape == (narrow, 128)
  assert (cfg.heads(narrow), cfg.heads(wide)) == (narrow // 64, wide // 64)
  assert (cfg.padding, cfg.grad_clamp, cfg.ln_eps) == ("border", False, 1e-5)
  assert cfg.quick_gelu == ("clip" in name)
  np.testing.assert_allclose(NORMALIZATION[name], normalization, rtol=0, atol=1e-8)


def test_num_classes_overrides_the_official_output_size():
  model = create_model(NAME, num_classes=7)
  logits, _ = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert logits.shape == (1, 7)


@pytest.mark.parametrize("name,overrides,message", [
    (NAME, dict(TINY, num_classes=1000), r"mis-shaped.*\n.*proj\.weight: checkpoint \(8, 128\)"),
    ("sparseformer_btsp_augreg_base", TINY, r"missing.*\n.*proj\.bias"),
])
def test_checkpoint_that_does_not_fit_names_its_keys(name, overrides, message):
  with pytest.raises(ValueError, match=message):
    load_torch_checkpoint(CHECKPOINT, name, **overrides)


def test_stage_embedding_row_i_is_added_before_repeat_i():
  _, variables = tiny_model()
  base = run()["units"][0]["embeddings"]                                  # (4, B, N, width)
  for row in (1, 3):
    params = jax.tree_util.tree_map(np.array, variables["params"])         # a mutable copy
    params["focusing"]["stage_embedding"][row] += 1.0
    changed = run(params)["units"][0]["embeddings"]
    np.testing.assert_array_equal(changed[:row], base[:row])
    assert np.abs(changed[row] - base[row]).max() > 1e-3


def test_cls_token_is_prepended_before_the_first_vit_block_and_read_by_the_head():
  model, variables = tiny_model()
  out = run()
  assert [u["embeddings"].shape[2] for u in out["units"]] == [15, 15, 16, 16]
  assert [u["rois"].shape[2] for u in out["units"][:2]] == [15, 15]
  cls = out["units"][-1]["embeddings"][-1][:, 0]                          # (B, width)
  norm, head = variables["params"]["head_norm"], variables["params"]["head"]
  normed = (cls - cls.mean(-1, keepdims=True)) / np.sqrt(cls.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose((normed * norm["scale"] + norm["bias"]) @ head["kernel"],
                             out["logits"], atol=1e-4, rtol=0)
  assert "bias" not in head


def test_quick_gelu_only_in_units_that_do_not_repeat():
  clip, plain = run()["units"], run(quick_gelu=False)["units"]
  for unit, other in zip(clip[:2], plain[:2]):                            # focusing, sampling unit
    np.testing.assert_array_equal(unit["embeddings"], other["embeddings"])
  assert np.abs(clip[2]["embeddings"] - plain[2]["embeddings"]).max() > 1e-4   # first ViT block


def test_inflating_btsp_weights_adds_zero_time_to_the_adjust_mlp_output():
  _, variables = tiny_model()
  image, video = variables["params"], inflate_from_image(variables, 2)["params"]
  assert video["initial_embedding"].shape == (1, 64)                      # still shared
  adjust, image_adjust = video["focusing"]["roi_adjust"], image["focusing"]["roi_adjust"]
  np.testing.assert_array_equal(adjust["proj"]["kernel"][:, [0, 1, 3, 4]],
                                image_adjust["proj"]["kernel"])
  assert not np.any(adjust["proj"]["kernel"][:, [2, 5]])
  np.testing.assert_array_equal(adjust["fc"]["kernel"], image_adjust["fc"]["kernel"])
  assert video["focusing"]["offsets"]["proj"]["kernel"].shape == (64, 16 * 3)
  assert video["cortex"]["unit_0"]["offsets"]["bias"].shape == (16 * 3,)


def test_inflated_btsp_weights_fit_the_video_model():
  model, variables = tiny_model()
  video = SparseFormer(video_config(model.config, 2))
  expected = jax.eval_shape(lambda: video.init(jax.random.key(0), jnp.zeros((1, 2, 32, 32, 3))))
  expected = flax.traverse_util.flatten_dict(expected["params"])
  inflated = flax.traverse_util.flatten_dict(inflate_from_image(variables, 2)["params"])
  assert inflated.keys() == expected.keys()
  misfits = {"/".join(p): (inflated[p].shape, e.shape) for p, e in expected.items()
             if inflated[p].shape != e.shape}
  assert not misfits, f"inflated vs video model shapes: {misfits}"
