"""The video SparseFormer (docs/model.md §7) and image weights inflated into it, against the
fixtures."""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer_jax import (SparseFormer, inflate_from_image, load_torch_checkpoint,
                              load_torch_model, token_intermediates)
from sparseformer_jax.weights.inflate import video_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAME = "sparseformer_v1_tiny"
TINY = dict(conv_dim=32, num_tokens=16, num_points=36, focusing_width=64, cortex_width=128,
            cortex_depth=3, num_classes=10, drop_path_rate=0.0)
VIDEO_R2 = os.path.join(FIXTURES, "sf_v1_tiny_video_r2_library_format.pth")


@functools.lru_cache(maxsize=None)
def image_model():
  return load_torch_model(os.path.join(FIXTURES, "sf_v1_tiny_library_format.pth"), NAME, **TINY)


@functools.lru_cache(maxsize=None)
def inflated_model(replicates):
  """(video model, inflated variables) from the image fixture, in the image model's numerics."""
  model, variables = image_model()
  return (SparseFormer(video_config(model.config, replicates)),
          inflate_from_image(variables, replicates))


@functools.lru_cache(maxsize=None)
def reference():
  with np.load(os.path.join(FIXTURES, "sf_v1_tiny_video_r2_reference.npz")) as z:
    return {k: z[k] for k in z.files}


def shallow(model, variables, **config):
  """The model cut to one focusing repeat and its sampling cortex unit (short compiles), same
  weights; every video-specific op (stem, RoIs, trilinear sampling) is still in it."""
  model = model.clone(config=dataclasses.replace(model.config, focusing_repeats=1, cortex_depth=1,
                                                 **config))
  params = variables["params"]
  return model, {"params": {**params, "cortex": {"unit_0": params["cortex"]["unit_0"]}}}


def clip(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_inflated_image_weights_reproduce_official_video_logits():
  model, variables = inflated_model(2)
  ref = reference()
  video = jnp.asarray(np.transpose(ref["video_ncthw"], (0, 2, 3, 4, 1)))   # (B, T, H, W, C)
  np.testing.assert_allclose(model.apply(variables, video), ref["logits"], atol=1e-4, rtol=0)


def test_inflation_equals_the_official_inflated_checkpoint():
  _, ours = inflated_model(2)
  official = load_torch_checkpoint(VIDEO_R2, NAME, video=True, replicates=2, **TINY)
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(official)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ours, official)


def test_inflation_copies_tokens_replica_major_with_zero_time_outputs():
  _, image = image_model()
  image, video = image["params"], inflate_from_image(image, 3)["params"]
  rois = video["initial_roi"].reshape(3, 16, 6)                           # (replica, token, 6)
  for k in range(3):
    np.testing.assert_array_equal(rois[k][:, [0, 1, 3, 4]], image["initial_roi"])
    np.testing.assert_allclose(rois[k][:, [2, 5]], np.broadcast_to([k / 3, (k + 1) / 3], (16, 2)),
                               atol=1e-7)
  np.testing.assert_array_equal(video["initial_embedding"],
                                np.concatenate([image["initial_embedding"]] * 3))
  for unit in (video["focusing"], video["cortex"]["unit_0"]):
    kernel = unit["offsets"]["proj"]["kernel"]
    kernel = kernel.reshape(kernel.shape[0], 36, 3)                        # (width, P, xyt)
    assert not np.any(kernel[..., 2]) and not np.any(unit["offsets"]["bias"].reshape(36, 3)[:, 2])
    assert not np.any(unit["roi_adjust"]["proj"]["kernel"][:, [2, 5]])
  np.testing.assert_array_equal(video["focusing"]["offsets"]["bias"].reshape(36, 3)[:, :2],
                                image["focusing"]["offsets"]["bias"].reshape(36, 2))
  np.testing.assert_array_equal(video["stem"]["conv"]["kernel"], image["stem"]["conv"]["kernel"])


def test_inflation_rejects_video_weights():
  _, video = inflated_model(2)
  with pytest.raises(ValueError, match="already a video model"):
    inflate_from_image(video, 2)


def test_an_image_is_a_one_frame_video():
  model, variables = shallow(*image_model())
  video_model, video_variables = shallow(*inflated_model(1))
  images = clip((2, 36, 44, 3))
  np.testing.assert_allclose(jax.jit(video_model.apply)(video_variables, images[:, None]),
                             jax.jit(model.apply)(variables, images), atol=1e-5, rtol=0)


def test_video_model_reads_any_clip_size_with_3d_rois_and_points():
  model, variables = inflated_model(2)
  for shape in [(2, 1, 32, 32, 3), (2, 3, 40, 56, 3)]:   # B = 2 as in the fixture: cached eager ops
    out = token_intermediates(model, variables, clip(shape))
    assert out["logits"].shape == (shape[0], 10) and np.isfinite(out["logits"]).all()
    assert out["features"].shape == (shape[0], shape[1], shape[2] // 4, shape[3] // 4, 32)
    focusing = out["units"][0]
    assert focusing["rois"].shape == (4, shape[0], 32, 6)                 # (x1, y1, t1, x2, y2, t2)
    assert focusing["points"].shape == (4, shape[0], 32, 36, 3)           # (x, y, t)
    # Inflated weights never move a replica in time: replica k stays in [k/2, (k+1)/2].
    expected = np.repeat([[0.0, 0.5], [0.5, 1.0]], 16, axis=0)             # (32, 2): t1, t2
    for unit in out["units"]:
      spans = unit["rois"][..., [2, 5]]                                    # (R, B, 32, 2)
      np.testing.assert_array_equal(spans, np.broadcast_to(expected, spans.shape))


@pytest.mark.parametrize("shape", [(1, 32, 32, 3), (1, 2, 3, 32, 32, 3)])
def test_video_model_rejects_other_ranks(shape):
  model, variables = inflated_model(2)
  with pytest.raises(ValueError, match=r"videos of shape \(B, T, H, W, 3\)"):
    model.apply(variables, jnp.zeros(shape))


def test_gradients_flow_through_trilinear_sampling_in_train_mode():
  """Inflated weights start with equal t offsets for all points: every gradient is still finite
  and the points' t gets one."""
  model, variables = shallow(*inflated_model(2), drop_path_rate=0.1)
  video = clip((1, 3, 32, 32, 3))

  def loss(params, video):
    logits = model.apply({"params": params}, video, train=True, rngs={"dropout": jax.random.key(1)})
    return jnp.sum(logits * jnp.arange(10.0))

  grads, video_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], video)
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(grad).all(), f"non-finite gradient of {jax.tree_util.keystr(path)}"
  assert np.isfinite(video_grad).all() and np.abs(video_grad).sum(axis=(0, 2, 3, 4)).min() > 0
  assert np.abs(grads["stem"]["conv"]["kernel"]).max() > 0   # reachable only through sampling
  time_bias = grads["focusing"]["offsets"]["bias"].reshape(36, 3)[:, 2]
  assert np.abs(time_bias).max() > 0                          # d logits / d t of the points
