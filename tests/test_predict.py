"""predict: the eval transform, softmax of the logits, names by index, bad files, the script."""
import functools
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from PIL import Image

from sparseformer_jax import load_pretrained, predict
from sparseformer_jax.data import augment, image_files, input_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH = os.path.join(ROOT, "tests", "fixtures", "sf_v1_tiny_library_format.pth")
TINY = dict(conv_dim=32, num_tokens=16, focusing_width=64, cortex_width=128, cortex_depth=3,
            num_classes=10, drop_path_rate=0.0)
NAMES = [f"name of {i}" for i in range(10)]


@functools.lru_cache(maxsize=None)
def classifier():
  model, variables = load_pretrained("sparseformer_v1_tiny", PTH, **TINY)
  config = predict.eval_input_config((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), image_size=48)
  return predict.Classifier(model, variables, config, NAMES)


def write_images(folder, huge=True):
  """Every kind of file a photo folder holds; returns {name: expected to be readable}."""
  rng = np.random.default_rng(0)
  folder.mkdir(exist_ok=True)
  Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / "rgb.png")
  Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), "L").save(folder / "gray.png")
  Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8), "RGBA").save(
      folder / "rgba.png")
  Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(
      folder / "deep16.png")
  Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(folder / "one_pixel.png")
  if huge:
    Image.fromarray(np.zeros((6000, 6000, 3), np.uint8)).save(folder / "huge.png")
  (folder / "empty.jpg").write_bytes(b"")
  (folder / "notes.jpg").write_text("not a picture")
  jpeg = folder / "whole.jpg"
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg)
  (folder / "truncated.jpg").write_bytes(jpeg.read_bytes()[:400])
  jpeg.unlink()
  return {"rgb.png": True, "gray.png": True, "rgba.png": True, "deep16.png": True,
          "one_pixel.png": True, **({"huge.png": True} if huge else {}), "empty.jpg": False,
          "notes.jpg": False, "truncated.jpg": False}


def test_preprocessing_is_the_input_pipelines_eval_transform_on_the_encoded_file(tmp_path):
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(
      tmp_path / "x.png")
  config = classifier().input_config
  ours = predict.preprocess(image_files.load_rgb(str(tmp_path / "x.png")), config)
  pipeline = augment.eval_transform(tf.constant((tmp_path / "x.png").read_bytes()), config)
  assert ours.shape == (48, 48, 3)
  np.testing.assert_array_equal(ours, pipeline.numpy())


def test_probabilities_are_the_softmax_of_the_logits_and_names_follow_the_indices(tmp_path):
  write_images(tmp_path, huge=False)
  files = [str(tmp_path / "rgb.png"), str(tmp_path / "gray.png"), str(tmp_path / "rgba.png")]
  results = list(predict.classify_files(classifier(), files, top=10, batch_size=2))
  assert [r["image"] for r in results] == files
  c = classifier()
  pixels = np.stack([predict.preprocess(image_files.load_rgb(f), c.input_config) for f in files])
  logits = jax.jit(c.model.apply, static_argnames="train")(c.variables, pixels, train=False)
  for result, probs in zip(results, np.asarray(jax.nn.softmax(logits))):
    top = result["top"]
    assert [t["index"] for t in top] == list(np.argsort(-probs, kind="stable"))
    assert all(t["label"] == NAMES[t["index"]] for t in top)
    np.testing.assert_allclose([t["prob"] for t in top], np.sort(probs)[::-1], rtol=1e-5)


def test_a_folder_with_bad_files_still_predicts_the_others(tmp_path):
  readable = write_images(tmp_path / "photos")
  results = {os.path.basename(r["image"]): r for r in predict.classify_files(
      classifier(), [str(tmp_path / "photos")], top=3, batch_size=2)}
  assert set(results) == set(readable)
  for name, ok in readable.items():
    assert ("top" in results[name]) == ok, results[name]
    if not ok:
      assert name in results[name]["error"] and "\n" not in results[name]["error"]
  assert "empty" in results["empty.jpg"]["error"]
  missing = list(predict.classify_files(classifier(), [str(tmp_path / "nowhere.png")]))
  assert missing == [{"image": str(tmp_path / "nowhere.png"),
                      "error": f"{tmp_path / 'nowhere.png'}: no such file."}]


def test_imagenet_class_names_ship_with_the_package():
  names = predict.imagenet_class_names()
  assert len(names) == len(set(names)) == 1000
  assert (names[0], names[207], names[281], names[999]) == (
      "tench", "golden retriever", "tabby", "toilet tissue")
  run = ml_collections.ConfigDict({"dataset": "imagenet2012:5.1.0", "data_dir": None})
  assert predict.dataset_class_names(run) == names  # not TFDS's WordNet ids


def test_a_workdir_brings_its_input_config_and_its_datasets_label_names(tmp_path):
  from test_pretrained import fake_workdir  # pylint: disable=g-import-not-at-top
  fake_workdir(tmp_path / "run")              # a sparseformer_v1_tiny run on synthetic_objects
  c = predict.load_classifier(source=str(tmp_path / "run"), ema=True)
  assert c.input_config.image_size == 64 and tuple(c.input_config.mean) == (0.5, 0.5, 0.5)
  assert len(c.class_names) == 10 and c.class_names[0] != "class 0"
  assert c.class_names == list(input_pipeline.get_builder("synthetic_objects", None).info
                               .features["label"].names)


def test_script_prints_json_lines_and_fails_at_the_end_for_bad_files(tmp_path):
  readable = write_images(tmp_path / "photos", huge=False)  # huge: covered above
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "predict.py"), "--model",
         "sparseformer_v1_tiny", "--weights", PTH, "--images", str(tmp_path / "photos"),
         "--resolution", "48", "--top", "3", "--json"] + [f"--override={k}={v}"
                                                        for k, v in TINY.items()]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1, result.stderr[-2000:]
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  assert sorted(os.path.basename(r["image"]) for r in lines) == sorted(
      n for n, ok in readable.items() if ok)
  for record in lines:
    assert len(record["top"]) == 3
    assert record["top"][0]["label"] == f"class {record['top'][0]['index']}"
    assert record["top"][0]["prob"] >= record["top"][1]["prob"]
  errors = [line for line in result.stderr.splitlines() if line.startswith("predict.py: ")]
  bad = [n for n, ok in readable.items() if not ok]
  assert len(errors) == len(bad) + 1 and "3 file(s) could not be read" in errors[-1]
  for name in bad:
    assert sum(name in line for line in errors) == 1
