"""scripts/visualize.py and the RoI picture it draws."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from sparseformer_jax.analysis.visualize import (denormalize, point_density, render_density,
                                                 render_rois, sampling_points, stages)

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


def test_point_density_counts_the_points_inside_the_image_per_cell():
  points = np.array([[[0.1, 0.1], [0.1, 0.12], [0.9, 0.6], [1.5, 0.5], [-0.1, 0.2]]], np.float32)
  density = point_density(points, bins=4)
  assert density.shape == (1, 4, 4) and np.isclose(density.sum(), 1.0)
  assert np.isclose(density[0, 0, 0], 2 / 3)      # row = y, column = x
  assert np.isclose(density[0, 2, 3], 1 / 3)      # (x 0.9, y 0.6); the two outside are dropped
  out = fake_intermediates(batch=2, tokens=3, points=4)
  assert sampling_points(out).shape == (2, 5 * 3 * 4, 2)   # every point of the 5 stages


def test_density_picture_has_a_cell_per_image_and_the_mean():
  images = np.zeros((3, 32, 32, 3), np.uint8)
  densities = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
  picture = render_density(images, densities, densities.mean(0), 3, cell_size=40, columns=2)
  assert picture.shape == (2 * (40 + 16), 2 * 40, 3)    # 4 cells in rows of 2


def test_script_draws_official_weights_on_image_files(tmp_path):
  Image.fromarray(np.full((40, 60, 3), 60, np.uint8)).save(tmp_path / "img0.png")
  # 16-bit, dark: it must come out dark (a plain PIL convert('RGB') clips it to white).
  Image.fromarray(np.full((40, 60), 8000, np.uint16)).save(tmp_path / "img1.png")
  (tmp_path / "broken.png").write_text("not a picture")
  out = tmp_path / "rois.png"
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "visualize.py"), "--torch", FIXTURE,
         "--model", "sparseformer_v1_tiny", "--resolution", "64", "--cell_size", "80",
         "--points", "--density", "--out", str(out), "--images", str(tmp_path / "img0.png"),
         "--images", str(tmp_path / "img1.png"), "--images", str(tmp_path / "broken.png")
         ] + [f"--override={o}" for o in TINY]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("visualize.py: ")]
  assert len(errors) == 2 and "broken.png: not an image" in errors[0]
  with Image.open(out) as picture:
    assert picture.size == (6 * 80, 16 + 2 * 80)     # input + 4 focusing repeats + cortex
    deep = np.asarray(picture)[16 + 80:, :80]          # the 16-bit image's input cell
    assert 25 <= deep.mean() <= 40                     # 8000 / 65535 * 255 = 31
  with Image.open(tmp_path / "rois_density.png") as density:
    assert density.size == (3 * 80, 80 + 16)           # two images and their mean
