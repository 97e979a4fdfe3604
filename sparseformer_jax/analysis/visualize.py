"""Pictures of where SparseFormer's tokens look: every token's RoI (and optionally its sampling
points) after each focusing repeat and after the cortex's sampling unit, one row per image; and
heat maps of where all the sampling points land, per image and averaged over many."""
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


def sampling_points(intermediates) -> np.ndarray:
  """(B, K, 2) every sampling point of every stage, as (x, y) in [0, 1]."""
  points = [pts.reshape(pts.shape[0], -1, 2) for _, _, pts in stages(intermediates)]
  return np.concatenate(points, axis=1)


def point_density(points: np.ndarray, bins: int) -> np.ndarray:
  """(B, K, 2) points -> (B, bins, bins) float32 histograms (row = y, column = x), each summing
  to 1 over the points that land inside the image."""
  out = np.zeros((points.shape[0], bins, bins), np.float32)
  for i, xy in enumerate(points):
    inside = np.all((xy >= 0) & (xy <= 1), axis=-1)
    counts, _, _ = np.histogram2d(xy[inside, 1], xy[inside, 0], bins=bins,
                                  range=[[0, 1], [0, 1]])
    out[i] = counts / max(counts.sum(), 1)
  return out


def _heat_cell(density: np.ndarray, image, size: int) -> Image.Image:
  """A density as an 'inferno' heat map `size` pixels high, blended over `image` if given."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  scaled = density / max(float(density.max()), 1e-12)
  heat = Image.fromarray((colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8))
  if image is None:
    return heat.resize((size, size), Image.BILINEAR)
  width = max(1, round(size * image.shape[1] / image.shape[0]))
  heat = heat.resize((width, size), Image.BILINEAR)
  gray = Image.fromarray(image).convert("L").convert("RGB").resize((width, size), Image.BILINEAR)
  return Image.blend(gray, heat, 0.65)


def render_density(images: np.ndarray, densities: np.ndarray, mean_density: np.ndarray,
                   count: int, *, cell_size: int = 192, columns: int = 8) -> np.ndarray:
  """uint8 grid: each image with its sampling-point heat map, then the mean over `count` images
  (the paper's sampling-density figure), `columns` cells per row."""
  cells = [(f"image {i + 1}", _heat_cell(d, im, cell_size))
           for i, (im, d) in enumerate(zip(images, densities))]
  cells.append((f"mean of {count} images", _heat_cell(mean_density, None, cell_size)))
  cell_w = max(cell.width for _, cell in cells)
  rows = -(-len(cells) // columns)
  grid = Image.new("RGB", (cell_w * min(columns, len(cells)), rows * (cell_size + 16)), "white")
  draw = ImageDraw.Draw(grid)
  for i, (title, cell) in enumerate(cells):
    x, y = (i % columns) * cell_w, (i // columns) * (cell_size + 16)
    draw.text((x + 4, y + 2), title, fill="black")
    grid.paste(cell, (x, y + 16))
  return np.asarray(grid)
