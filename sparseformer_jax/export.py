"""Serving artifacts of a SparseFormer: a jax.export program, a TF SavedModel, and a JSON card.

    out/model.jax_export   jax.export.serialize(...): batch dimension symbolic, every platform
    out/saved_model/       TF SavedModel (jax2tf) with a `serving_default` signature, for TF Serving
    out/model.json         model name, input shape and layout, normalization, class names

Both programs take float32 images (B, H, W, 3), normalized with the JSON's mean and std, and
return float32 logits (B, num_classes). They are traced with the plain ops (sparseformer_jax/ops),
so one artifact serves every platform it was lowered for.
"""
import json
import os
import tempfile
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from sparseformer_jax import ops
from sparseformer_jax.models import NORMALIZATION, create_model

EXPORT_FILE, SAVED_MODEL_DIR, CARD_FILE = "model.jax_export", "saved_model", "model.json"
PLATFORMS = ("cpu", "cuda", "tpu")


def input_shape(model, resolution: Tuple[int, int], num_frames: int = 0):
  """The input spec with a symbolic batch 'b': (b, H, W, 3), or (b, T, H, W, 3) for video."""
  if model.config.video and num_frames < 1:
    raise ValueError("A video model needs num_frames >= 1 (the clip length it serves).")
  spatial = ((num_frames,) if model.config.video else ()) + tuple(resolution) + (3,)
  batch, = jax.export.symbolic_shape("b")
  return jax.ShapeDtypeStruct((batch, *spatial), jnp.float32)


def _atomic_write(path: str, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def check_arguments(out_dir: str, platforms: Sequence[str]) -> None:
  """Raises a one-line error for unknown platforms or an `out_dir` that holds an export."""
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms {list(platforms)}: expected some of {', '.join(PLATFORMS)}.")
  taken = [f for f in (EXPORT_FILE, SAVED_MODEL_DIR, CARD_FILE)
           if os.path.exists(os.path.join(out_dir, f))]
  if taken:
    raise FileExistsError(f"{out_dir} already holds an export ({', '.join(taken)}); choose a "
                          "new --out directory.")


def export_model(model, variables, out_dir: str, *, name: str, resolution: Tuple[int, int],
                 platforms: Sequence[str] = ("cpu",), num_frames: int = 0,
                 class_names: Optional[Sequence[str]] = None) -> dict:
  """Writes the three artifacts into `out_dir` (created if needed; one that already holds an
  export is refused, never overwritten) and returns the JSON card."""
  check_arguments(out_dir, platforms)
  os.makedirs(out_dir, exist_ok=True)
  spec = input_shape(model, resolution, num_frames)
  logits = lambda images: model.apply(variables, images, train=False)
  with ops.cpu_workarounds(False):
    exported = jax.export.export(jax.jit(logits), platforms=tuple(platforms))(spec)
  _atomic_write(os.path.join(out_dir, EXPORT_FILE), exported.serialize())
  _write_saved_model(logits, spec, platforms, os.path.join(out_dir, SAVED_MODEL_DIR))
  mean, std = NORMALIZATION.get(name, (None, None))
  card = {
      "model": name, "platforms": list(platforms),
      "input": {"shape": ["batch", *spec.shape[1:]], "layout": "NTHWC" if num_frames else "NHWC",
                "dtype": "float32", "channels": "RGB"},
      "normalization": {"mean": list(mean) if mean else None, "std": list(std) if std else None,
                        "formula": "(pixel / 255 - mean) / std, per channel"},
      "output": {"shape": ["batch", model.config.num_classes], "dtype": "float32",
                 "meaning": "logits"},
      "class_names": list(class_names) if class_names else None,
      "files": {"jax_export": EXPORT_FILE, "saved_model": SAVED_MODEL_DIR},
  }
  _atomic_write(os.path.join(out_dir, CARD_FILE), (json.dumps(card, indent=2) + "\n").encode())
  return card


def _write_saved_model(logits, spec, platforms, path: str) -> None:
  """`logits` as a TF SavedModel with a `serving_default` signature over a polymorphic batch,
  written beside `path` and renamed into place."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  dims = ", ".join(["b"] + [str(d) for d in spec.shape[1:]])
  converted = jax2tf.convert(logits, polymorphic_shapes=[f"({dims})"], with_gradient=False,
                             native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.serve = tf.function(
      lambda images: {"logits": converted(images)}, autograph=False,
      input_signature=[tf.TensorSpec((None, *spec.shape[1:]), tf.float32, name="images")])
  tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".tmp-saved_model-")
  with ops.cpu_workarounds(False):   # jax2tf traces the model here
    tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})
  os.replace(tmp, path)


def load_exported(out_dir: str):
  """The deserialized jax.export program: `.call(images)` gives the logits."""
  with open(os.path.join(out_dir, EXPORT_FILE), "rb") as f:
    return jax.export.deserialize(bytearray(f.read()))
