"""scripts/export.py: the jax.export program and the TF SavedModel give model.apply's logits."""
import json
import os
import sys

import jax
import numpy as np
import pytest

from sparseformer_jax import export, load_torch_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import export as export_script  # pylint: disable=g-import-not-at-top,wrong-import-position

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TORCH_FILE = os.path.join(FIXTURES, "sf_v1_tiny_imagenet_format.pth")
TINY = ["conv_dim=32", "num_tokens=16", "num_points=36", "focusing_width=64",
        "cortex_width=128", "cortex_depth=3", "num_classes=10"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "sf")
  names = tmp_path_factory.getbasetemp() / "classes.txt"
  names.write_text("".join(f"class {i}\n" for i in range(10)))
  card = export_script.main(["--model", "sparseformer_v1_tiny", "--weights", TORCH_FILE,
                             "--out", out, "--platforms", "cpu,cuda,tpu", "--resolution",
                             "40x56", "--class-names", str(names)]
                            + [f"--override={o}" for o in TINY])
  model, variables = load_torch_model(TORCH_FILE, "sparseformer_v1_tiny",
                                      **{o.split("=")[0]: int(o.split("=")[1]) for o in TINY})
  return out, card, model, variables


@pytest.mark.parametrize("batch", [1, 3])
def test_both_artifacts_give_the_models_logits(exported, batch):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out, _, model, variables = exported
  images = np.asarray(jax.random.normal(jax.random.key(batch), (batch, 40, 56, 3)))
  want = model.apply(variables, images)
  program = export.load_exported(out)
  assert set(program.platforms) == {"cpu", "cuda", "tpu"}
  np.testing.assert_allclose(program.call(images), want, rtol=1e-5, atol=1e-5)
  served = tf.saved_model.load(os.path.join(out, export.SAVED_MODEL_DIR))
  logits = served.signatures["serving_default"](images=tf.constant(images))["logits"]
  np.testing.assert_allclose(logits.numpy(), want, rtol=1e-5, atol=1e-5)


def test_the_card_describes_the_input_and_bad_arguments_are_refused(exported):
  out, card, _, _ = exported
  on_disk = json.loads(open(os.path.join(out, export.CARD_FILE)).read())
  assert on_disk == card and card["input"]["shape"] == ["batch", 40, 56, 3]
  assert card["normalization"]["mean"] == [0.485, 0.456, 0.406]
  assert card["class_names"][3] == "class 3" and card["output"]["shape"] == ["batch", 10]
  with pytest.raises(SystemExit, match="already holds an export"):
    export_script.main(["--model", "sparseformer_v1_tiny", "--weights", TORCH_FILE, "--out", out])
  with pytest.raises(SystemExit, match="platforms.*expected some of cpu, cuda, tpu"):
    export_script.main(["--model", "sparseformer_v1_tiny", "--weights", TORCH_FILE, "--out",
                        out + "_new", "--platforms", "cpu,gpu"])
