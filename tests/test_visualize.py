"""scripts/visualize.py and the RoI picture it draws."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from sparseformer_jax.analysis.visualize import denormalize, render_rois, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "sf_v1_tiny_library_format.pth")
TINY = ["conv_dim=32", "num_tokens=16", "focusing_width=64", "cortex_width=128", "cortex_depth=3",
        "num_classes=10"]


def fake_intermediates(batch=2, tokens=3, points=4):
  rois = np.tile(np.array([0.1, 0.1, 0.6, 0.6], np.float32), (4, batch, tokens, 1))
  pts = np.full((4, batch, tokens, points, 2), 0.3, np.float32)
  return {"units": [{"name": "focusing", "rois": rois, "points": pts},
                    {"name": "cortex/unit_0", "rois": rois[:1], "points": pts[:1]},
                    {"name": "cortex/unit_1", "rois": rois[:1]}]}


def test_grid_has_a_column_per_focusing_repeat_and_the_cortex_sampling_unit():
  images = np.zeros((2, 32, 48, 3), np.uint8)
  out = fake_intermediates()
  assert [title for title, _, _ in stages(out)] == ["focusing 1", "focusing 2", "focusing 3",
                                                     "focusing 4", "cortex"]
  grid = render_rois(images, out, cell_size=64, show_points=True)
  assert grid.shape == (16 + 2 * 64, 6 * 96, 3) and grid.dtype == np.uint8
  cell = grid[16:16 + 64, 96:2 * 96]                 # image 0 after focusing repeat 1
  assert cell.max() > 0                               # RoI outlines and points were drawn
  assert grid[16:16 + 64, :96].max() == 0             # the input column stays the bare image


def test_denormalize_inverts_the_input_normalization():
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
  pixels = np.random.default_rng(0).integers(0, 256, (1, 4, 4, 3)).astype(np.uint8)
  normalized = (pixels / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_array_equal(denormalize(normalized, mean, std), pixels)


def test_script_draws_official_weights_on_image_files(tmp_path):
  for i in range(2):
    Image.fromarray(np.full((40, 60, 3), 60 * i, np.uint8)).save(tmp_path / f"img{i}.png")
  out = tmp_path / "rois.png"
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "visualize.py"), "--torch", FIXTURE,
         "--model", "sparseformer_v1_tiny", "--resolution", "64", "--cell_size", "80",
         "--points", "--out", str(out), "--images", str(tmp_path / "img0.png"),
         "--images", str(tmp_path / "img1.png")] + [f"--override={o}" for o in TINY]
  subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
  with Image.open(out) as picture:
    assert picture.size == (6 * 80, 16 + 2 * 80)     # input + 4 focusing repeats + cortex
