"""Inflating image SparseFormer weights into a video SparseFormer (docs/model.md §7).

The official MediaSparseFormer starts from image weights (`load_2d_state_dict`): every latent
token is copied `replicates` times, replica k looking at the time span [k/r, (k+1)/r], and every
layer that outputs coordinates gets a zero time component, so a video model starts out as r
copies of the image model, each over its own stretch of time.
"""
import dataclasses
from typing import Any, Dict, Tuple

import flax
import jax.numpy as jnp

from sparseformer_jax.models import roi as roi_lib
from sparseformer_jax.models.config import SparseFormerConfig

# Leaves whose last axis holds (x, y) pairs that gain a zero t: the points' offsets (one pair per
# point) and the RoI adjust projection (centers, then log-sizes).
_ZERO_TIME_LEAVES = (("offsets", "proj", "kernel"), ("offsets", "bias"),
                     ("roi_adjust", "proj", "kernel"))


def _insert_time(pairs, time):
  """(..., G*2) (x, y) pairs and a time value per pair, broadcastable to (..., G) -> (..., G*3)."""
  pairs = pairs.reshape(*pairs.shape[:-1], -1, 2)                         # (..., G, 2)
  time = jnp.broadcast_to(jnp.asarray(time, pairs.dtype), pairs.shape[:-1])[..., None]
  return jnp.concatenate([pairs, time], axis=-1).reshape(*pairs.shape[:-2], -1)


def _inflate_leaf(path: Tuple[str, ...], value, replicates: int):
  """The video model's value of one image-model leaf; leaves without coordinates stay as is."""
  if path == ("initial_roi",):                                            # (N, 4) -> (r*N, 6)
    spans = roi_lib.initial_rois(1, dims=3, replicates=replicates)[:, [2, 5]]   # (r, 2): t1, t2
    tiled = jnp.broadcast_to(value, (replicates, *value.shape))           # (r, N, 4)
    return _insert_time(tiled, spans[:, None]).reshape(-1, 6)
  if path == ("initial_embedding",) and value.shape[0] > 1:               # (N, w) -> (r*N, w)
    return jnp.tile(value, (replicates, 1))
  if any(path[-len(leaf):] == leaf for leaf in _ZERO_TIME_LEAVES):
    return _insert_time(value, 0.0)                                       # (..., 2G) -> (..., 3G)
  return value


def inflate_from_image(variables: Dict[str, Any], replicates: int) -> Dict[str, Any]:
  """The video model's {'params'} (video=True, `replicates`) from an image model's {'params'}.

  Tokens are copied replica-major (token k*N + n is replica k of image token n), replica k keeps
  the image RoI in x, y and spans [k/r, (k+1)/r] in t; a shared (1, width) initial embedding stays
  shared. Offset projections/biases and the RoI adjust projection (the v1 Linear or the last
  Linear of the btsp MLP) get zero t outputs, so t offsets start at 0 and adjusts never move or
  resize the time span. The stem kernel is 2-D in both models (the video stem runs per frame).
  Everything else (attention, MLPs, mixing, PE_INJECT, stage and CLS embeddings, head) is shared.
  """
  if "params" not in variables:
    raise ValueError(f"Expected flax variables {{'params': ...}}, got keys {sorted(variables)}.")
  if replicates < 1:
    raise ValueError(f"replicates={replicates}: expected >= 1.")
  params = flax.traverse_util.flatten_dict(variables["params"])
  if params[("initial_roi",)].shape[-1] != 4:
    raise ValueError(f"initial_roi has shape {params[('initial_roi',)].shape}: expected the (N, 4) "
                     "RoIs of an image model; these weights are already a video model's.")
  inflated = {path: _inflate_leaf(path, value, replicates) for path, value in params.items()}
  return {**variables, "params": flax.traverse_util.unflatten_dict(inflated)}


def video_config(image_config: SparseFormerConfig, replicates: int) -> SparseFormerConfig:
  """The video model's config for `inflate_from_image(…, replicates)` weights: the image model's
  numerics, except no gradient clamp (the official 3-D sampling never clamps, docs/model.md §7)."""
  return dataclasses.replace(image_config, video=True, replicates=replicates,
                             grad_clamp=False).validate()
