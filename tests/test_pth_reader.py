"""weights/pth_reader.py: the same arrays as torch.load, without PyTorch, and no code ever runs."""
import builtins
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparseformer_jax.weights.pth_reader import (CheckpointReadError, UnsafeCheckpointError,
                                                 read_pth)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
LEGACY = {"zip": True, "legacy": False}  # torch.save's _use_new_zipfile_serialization


def assert_same(ours, theirs):
  assert isinstance(ours, np.ndarray) and ours.shape == tuple(theirs.shape)
  theirs = theirs.detach()
  if theirs.dtype == torch.bfloat16:
    assert ours.dtype.name == "bfloat16"
    np.testing.assert_array_equal(ours.astype(np.float32), theirs.float().numpy())
  else:
    assert ours.dtype == theirs.numpy().dtype
    np.testing.assert_array_equal(ours, theirs.numpy())


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(FIXTURES) if f.endswith(".pth")))
def test_official_fixtures_read_as_torch_load_does(name):
  path = os.path.join(FIXTURES, name)
  ours, theirs = read_pth(path), torch.load(path, weights_only=True)
  assert list(ours) == list(theirs)
  for key in theirs:
    assert_same(ours[key], theirs[key])


@pytest.mark.parametrize("fmt", LEGACY)
def test_dtypes_views_and_shared_storages(tmp_path, fmt):
  base = torch.arange(60, dtype=torch.float32).reshape(5, 12)
  state = {
      "float32": base, "transposed": base.T, "window": base[1:4, 2:9:3],  # strides and offset
      "float16": base.half()[::2], "bfloat16": torch.nn.Parameter(base.bfloat16()[:, 3]),
      "int64": torch.arange(7), "bool": base > 30, "float64": base.double()[-1],
      "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
      "nested": {"list": [base[0], (base[1],)]},
  }
  path = tmp_path / "state.pth"
  torch.save(state, path, _use_new_zipfile_serialization=LEGACY[fmt])
  ours, theirs = read_pth(path), torch.load(path, weights_only=True)
  for key in state:
    if key != "nested":
      assert_same(ours[key], theirs[key])
  assert_same(ours["nested"]["list"][1][0], theirs["nested"]["list"][1][0])
  # The views share one storage in the file; ours are independent copies of the right elements.
  ours["float32"][0, 0] = -1
  assert ours["transposed"][0, 0] == 0 and ours["window"][0, 0] == base[1, 2]


class _Payload:
  """Pickles to a call of `function(*args)`: what a malicious checkpoint holds."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return self.function, self.args


def _payloads(marker):
  return {
      "os.system": _Payload(os.system, f"touch {marker}"),
      "builtins.eval": _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
      "subprocess": _Payload(subprocess.check_call, ["touch", str(marker)]),
  }


@pytest.mark.parametrize("fmt", LEGACY)
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, fmt, kind):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pth"
  torch.save({"weight": torch.ones(2), "x": _payloads(marker)[kind]}, path,
             _use_new_zipfile_serialization=LEGACY[fmt])
  with pytest.raises(UnsafeCheckpointError, match="refused: its pickle calls") as error:
    read_pth(path)
  assert "nothing was run" in str(error.value) and "\n" not in str(error.value)
  assert not marker.exists()
  if kind == "os.system":  # the file really runs code when loaded unsafely
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_plain_pickle_that_would_run_code_is_refused(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pth"
  path.write_bytes(pickle.dumps(_payloads(marker)["os.system"], protocol=2))
  with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system"):
    read_pth(path)
  assert not marker.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_text("this is a README, not weights\n"), "not a PyTorch checkpoint"),
    (lambda p: p.write_bytes(open(os.path.join(FIXTURES, "sf_v1_tiny_library_format.pth"),
                                  "rb").read()[:100_000]), "truncated or corrupt"),
])
def test_unreadable_files_get_one_clear_line(tmp_path, make, message):
  path = tmp_path / "weights.pth"
  make(path)
  with pytest.raises(CheckpointReadError, match=message) as error:
    read_pth(path)
  assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_truncated_legacy_file_is_reported(tmp_path):
  path = tmp_path / "old.pth"
  torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=False)
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(CheckpointReadError, match="truncated"):
    read_pth(path)


def test_fixtures_load_and_match_the_reference_logits_where_torch_cannot_be_imported():
  code = r"""
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
import numpy as np
from sparseformer_jax import load_pretrained
tiny = dict(conv_dim=32, num_tokens=16, focusing_width=64, cortex_width=128, cortex_depth=3,
            num_classes=10, drop_path_rate=0.0)
fixtures = sys.argv[1]
ref = np.load(f"{fixtures}/sf_v1_tiny_reference_square.npz")
images = np.transpose(ref["image_nchw"], (0, 2, 3, 1))
for layout in ("imagenet", "library"):
  model, variables = load_pretrained("sparseformer_v1_tiny",
                                     f"{fixtures}/sf_v1_tiny_{layout}_format.pth", **tiny)
  logits = model.apply(variables, images, train=False)
  np.testing.assert_allclose(logits, ref[f"logits_{layout}_format"], atol=1e-4, rtol=0)
assert "torch" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", code, FIXTURES], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")
