"""Classifies image files: the input pipeline's own eval transform, the model, softmax, top-k.

`load_classifier` gives a `Classifier` (model, variables, the eval input config, class names)
for official weights or any source `load_pretrained` takes; `classify_files` runs it over files
and folders, reporting an unreadable file in its place and going on with the others.
"""
import dataclasses
import functools
import importlib.resources
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from sparseformer_jax.data import augment
from sparseformer_jax.data import image_files
from sparseformer_jax.data import input_pipeline  # importing it keeps TensorFlow off the GPUs
from sparseformer_jax.models.config import NORMALIZATION
from sparseformer_jax.trainer import config_schema
from sparseformer_jax.weights import pretrained

# TFDS datasets with ImageNet-1K's 1000 classes in its order, whose label names are WordNet ids
# (or numbers): predict prints the readable names instead.
IMAGENET_DATASETS = ("imagenet2012", "imagenet2012_subset", "imagenet2012_real", "imagenet_v2")


@dataclasses.dataclass(frozen=True)
class Classifier:
  """What classify_files needs: the model, its variables, its eval preprocessing, its labels."""
  model: Any
  variables: Any
  input_config: ml_collections.ConfigDict  # image_size, crop_pct, mean, std of the eval transform
  class_names: List[str]


def imagenet_class_names() -> List[str]:
  """The 1000 ImageNet-1K class names, line i = class i (shipped in the package)."""
  text = (importlib.resources.files("sparseformer_jax.data") / "imagenet2012_classes.txt")
  return text.read_text().splitlines()


def dataset_class_names(config) -> List[str]:
  """The label names of a run's dataset (TFDS ClassLabel names; ImageNet's readable ones)."""
  if config.dataset.split("/")[0].split(":")[0] in IMAGENET_DATASETS:
    return imagenet_class_names()
  builder = input_pipeline.get_builder(config.dataset, config.get("data_dir"))
  return list(builder.info.features[config.get("label_key", "label")].names)


def eval_input_config(mean, std, image_size: Optional[int] = None) -> ml_collections.ConfigDict:
  """config.input of the schema's eval transform (crop_pct, size) with the given normalization."""
  config = config_schema.base_config().input
  config.mean, config.std = tuple(mean), tuple(std)
  config.image_size = image_size or config.image_size
  return config


def preprocess(pixels: np.ndarray, input_config) -> np.ndarray:
  """(H, W, 3) uint8 -> (size, size, 3) float32: augment.eval_transform, as evaluation does."""
  return augment.eval_transform(tf.constant(pixels), input_config).numpy()


def load_classifier(name: Optional[str] = None, source=None, *, image_size: Optional[int] = None,
                    ema: bool = False, **kwargs) -> Classifier:
  """A Classifier for `name`/`source` as in load_pretrained. A main.py workdir brings its own
  input config and label names; other weights use NORMALIZATION[name] and ImageNet's names."""
  if source is not None and pretrained.is_run(source):
    model, variables, config = pretrained.load_run(pretrained.fetch(source), name, ema=ema,
                                                   **kwargs)
    input_config = config.input.copy_and_resolve_references()
    input_config.image_size = image_size or input_config.image_size
    names = dataset_class_names(config)
  else:
    model, variables = pretrained.load_pretrained(name, source, ema=ema, **kwargs)
    name = name or pretrained.converted_name(source)
    input_config = eval_input_config(*NORMALIZATION[name], image_size)
    names = imagenet_class_names()
  classes = model.config.num_classes
  if model.config.video:
    raise ValueError("predict classifies images; this is a video model.")
  if classes != len(names):
    if name and "clip" in name:
      raise ValueError(f"{name} outputs {classes}-wide CLIP image embeddings, not class scores "
                       "(classifying with them needs CLIP's text tower).")
    names = [f"class {i}" for i in range(classes)]
  return Classifier(model, variables, input_config, names)


@functools.partial(jax.jit, static_argnums=0)
def probabilities(model, variables, images) -> jax.Array:
  """(B, C) softmax of the model's logits (float32); compiled once per model config and shape."""
  return jax.nn.softmax(model.apply(variables, images, train=False).astype(jnp.float32), axis=-1)


def top_classes(probs: np.ndarray, names: Sequence[str], k: int) -> List[Dict[str, Any]]:
  """The k most probable classes of one (C,) probability vector, most probable first."""
  order = np.argsort(-probs, kind="stable")[:k]
  return [{"index": int(i), "label": names[i], "prob": float(probs[i])} for i in order]


def read_images(paths: Sequence[str], input_config) -> Iterator[Tuple[str, Any, Optional[str]]]:
  """(file, preprocessed (size, size, 3) float32 or None, None or the error line) for every image
  file in `paths` (folders expanded), in order; a missing path or empty folder is an error."""
  for path in paths:
    files = list(image_files.list_image_files(path)) if os.path.exists(path) else []
    if not files:
      reason = "no image files in this folder" if os.path.isdir(path) else "no such file"
      yield path, None, f"{path}: {reason}."
    for file in files:
      try:
        yield file, preprocess(image_files.load_rgb(file), input_config), None
      except image_files.UnreadableImageError as e:
        yield file, None, str(e)


def classify_files(classifier: Classifier, paths: Sequence[str], *, top: int = 5,
                   batch_size: int = 8) -> Iterator[Dict[str, Any]]:
  """For every image file in `paths` (folders expanded), in order: {'image': path, 'top': [...]}
  or, for a file that cannot be read, {'image': path, 'error': one line}."""
  size = classifier.input_config.image_size
  pending: List[Tuple[str, Any, Optional[str]]] = []

  def flush():
    good = [pixels for _, pixels, _ in pending if pixels is not None]
    if good:
      batch = np.zeros((batch_size, size, size, 3), np.float32)  # one shape: one compilation
      batch[:len(good)] = good
      probs = iter(np.asarray(probabilities(classifier.model, classifier.variables, batch)))
    for file, pixels, error in pending:
      yield ({"image": file, "error": error} if pixels is None else
             {"image": file, "top": top_classes(next(probs), classifier.class_names, top)})
    pending.clear()

  for item in read_images(paths, classifier.input_config):
    pending.append(item)
    if sum(pixels is not None for _, pixels, _ in pending) == batch_size:
      yield from flush()
  yield from flush()
