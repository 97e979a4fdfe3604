"""Pictures of where SparseFormer's tokens look: every token's RoI (and optionally its sampling
points) after each focusing repeat and after the cortex's sampling unit, one row per image."""
import colorsys
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw


def token_colors(num_tokens: int) -> List[Tuple[int, int, int]]:
  """Evenly spaced vivid hues, one per token, so a token keeps its color across stages."""
  return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(num_tokens, 1), 0.9, 1.0))
          for i in range(num_tokens)]


def denormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Normalized float images (B, H, W, 3) -> displayable uint8."""
  pixels = images * np.asarray(std) + np.asarray(mean)
  return np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)


def stages(intermediates) -> List[Tuple[str, np.ndarray, np.ndarray]]:
  """(title, rois (B, N, 4), points (B, N, P, 2)) after every repeat of every sampling unit."""
  out = []
  for unit in intermediates["units"]:
    if "points" not in unit:
      continue
    short = "focusing" if unit["name"] == "focusing" else "cortex"
    for r in range(unit["rois"].shape[0]):
      title = f"{short} {r + 1}" if unit["rois"].shape[0] > 1 else short
      out.append((title, unit["rois"][r], unit["points"][r]))
  return out


def _draw_cell(image: np.ndarray, rois, points, size: int, show_points: bool) -> Image.Image:
  """One image scaled to `size` pixels high with its tokens' RoIs (and points) drawn on it."""
  height, width = image.shape[:2]
  cell_w = max(1, round(size * width / height))
  cell = Image.fromarray(image).resize((cell_w, size), Image.NEAREST).convert("RGB")
  if rois is None:
    return cell
  draw = ImageDraw.Draw(cell)
  colors = token_colors(len(rois))
  scale = np.array([cell_w, size, cell_w, size], np.float32)
  for color, roi, pts in zip(colors, rois, points):
    x1, y1, x2, y2 = np.clip(roi * scale, -1, max(cell_w, size))
    draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=color, width=1)
    if show_points:
      for x, y in pts * scale[:2]:
        draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=color)
  return cell


def render_rois(images: np.ndarray, intermediates, *, cell_size: int = 192,
                show_points: bool = False) -> np.ndarray:
  """uint8 (rows * cell, cols * cell_w, 3) grid: per image, the input then each stage's RoIs."""
  columns = [("input", None, None)] + stages(intermediates)
  rows = []
  for b, image in enumerate(images):
    cells = [_draw_cell(image, None if rois is None else rois[b],
                        None if pts is None else pts[b], cell_size, show_points)
             for _, rois, pts in columns]
    row = Image.new("RGB", (sum(c.width for c in cells), cell_size), "white")
    x = 0
    for cell in cells:
      row.paste(cell, (x, 0))
      x += cell.width
    rows.append(row)
  grid = Image.new("RGB", (rows[0].width, cell_size * len(rows) + 16), "white")
  draw = ImageDraw.Draw(grid)
  cell_w = rows[0].width // len(columns)
  for i, (title, _, _) in enumerate(columns):
    draw.text((i * cell_w + 4, 2), title, fill="black")
  for i, row in enumerate(rows):
    grid.paste(row, (0, 16 + i * cell_size))
  return np.asarray(grid)
