"""scripts/convert_checkpoint.py on files that are not (safe) checkpoints: one line, exit 1."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _RunsCode:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["text", "code"])
def test_a_bad_pth_gets_one_line_and_nothing_is_written(tmp_path, kind):
  path = tmp_path / "weights.pth"
  if kind == "text":
    path.write_text("<html>404 Not Found</html>\n")
  else:
    torch.save({"weight": torch.ones(2), "x": _RunsCode(tmp_path / "ran")}, path)
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "convert_checkpoint.py"), "--torch",
         str(path), "--model", "sparseformer_v1_tiny", "--out", str(tmp_path / "out")]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1
  lines = [l for l in result.stderr.splitlines() if l.startswith("convert_checkpoint.py: ")]
  assert len(lines) == 1 and str(path) in lines[0], result.stderr[-2000:]
  assert ("not a PyTorch checkpoint" if kind == "text" else "refused") in lines[0]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()
