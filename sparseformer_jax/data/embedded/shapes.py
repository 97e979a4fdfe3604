"""Drawing helpers shared by the locally generated synthetic datasets.

Everything works on float32 canvases of shape (H, W, 3) with values in
[0, 255]; `to_uint8` converts the finished canvas. Positions are continuous
pixel coordinates (y, x) where pixel i covers [i, i + 1), so objects can move
by fractions of a pixel; shapes are anti-aliased by supersampling.
"""

import colorsys
import math

import numpy as np

_SUPERSAMPLE = 3  # sub-samples per pixel and axis used for anti-aliasing
_SUBPIXEL_OFFSETS = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE


# Shape predicates take coordinates (u: right, v: down) normalised so the
# shape's bounding box is [-1, 1]^2, and return where the shape is filled.
def _square(u, v):
  return np.maximum(abs(u), abs(v)) <= 0.85


def _circle(u, v):
  return u**2 + v**2 <= 0.95**2


def _triangle(u, v):
  """Pointing up: apex at the top, base at the bottom."""
  return (v <= 0.85) & (abs(u) <= 0.95 * (v + 0.95) / 1.8)


def _diamond(u, v):
  return abs(u) + abs(v) <= 1.0


def _plus(u, v):
  return (np.minimum(abs(u), abs(v)) <= 0.3) & (np.maximum(abs(u), abs(v)) <= 0.95)


def _cross(u, v):
  """A diagonal cross (an x)."""
  on_diagonal = (abs(u - v) <= 0.42) | (abs(u + v) <= 0.42)
  return on_diagonal & (np.maximum(abs(u), abs(v)) <= 0.9)


def _ring(u, v):
  radius_sq = u**2 + v**2
  return (radius_sq >= 0.5**2) & (radius_sq <= 0.95**2)


def _frame(u, v):
  """A hollow square."""
  extent = np.maximum(abs(u), abs(v))
  return (extent >= 0.45) & (extent <= 0.85)


def _tee(u, v):
  inside = np.maximum(abs(u), abs(v)) <= 0.9
  return inside & ((v <= -0.3) | (abs(u) <= 0.3))


def _ell(u, v):
  inside = np.maximum(abs(u), abs(v)) <= 0.9
  return inside & ((u <= -0.3) | (v >= 0.3))


SHAPES = {
    'square': _square,
    'circle': _circle,
    'triangle': _triangle,
    'diamond': _diamond,
    'plus': _plus,
    'cross': _cross,
    'ring': _ring,
    'frame': _frame,
    'tee': _tee,
    'ell': _ell,
}
SHAPE_NAMES = tuple(SHAPES)


def draw_shape(canvas, shape, center, size, color, *, wrap=False):
  """Alpha-blends an anti-aliased `shape` onto `canvas` in place.

  Args:
    canvas: float array (H, W, 3), modified in place.
    shape: a key of SHAPES.
    center: (y, x) centre of the shape's bounding box, in pixels.
    size: side of the shape's square bounding box, in pixels.
    color: RGB triple in [0, 255].
    wrap: treat the canvas as a torus, so a shape crossing one border
      reappears at the opposite one (lets objects move forever); otherwise the
      part outside the canvas is clipped.
  """
  height, width = canvas.shape[:2]
  rows, v = _window_coordinates(center[0], size, height, wrap)
  cols, u = _window_coordinates(center[1], size, width, wrap)
  # inside: (rows, sub-row, cols, sub-col); averaging the sub-samples gives
  # the fraction of each pixel that the shape covers.
  inside = SHAPES[shape](u[None, None, :, :], v[:, :, None, None])
  alpha = inside.sum(axis=(1, 3))[..., None] * np.float32(1 / _SUPERSAMPLE**2)
  window = (rows[:, None], cols[None, :])
  canvas[window] += alpha * (np.asarray(color, np.float32) - canvas[window])


def _window_coordinates(center, size, extent, wrap):
  """Pixel indices along one axis that a shape may touch, and their sub-sample
  coordinates (index, sub-sample) normalised to the shape's box [-1, 1]."""
  half = size / 2
  indices = np.arange(math.floor(center - half), math.ceil(center + half))
  coords = (indices[:, None] + _SUBPIXEL_OFFSETS[None, :] - center) / half
  if wrap:
    return indices % extent, coords
  visible = (indices >= 0) & (indices < extent)
  return indices[visible], coords[visible]


def textured_background(rng, height, width, *, grid=5):
  """A gray background: random base level, smooth low-frequency blotches and
  per-pixel noise, so objects cannot be found by a flat-color test."""
  coarse = rng.normal(0.0, 18.0, size=(grid, grid))
  smooth = _upsample_matrix(height, grid) @ coarse @ _upsample_matrix(width, grid).T
  noise = rng.normal(0.0, 8.0, size=(height, width))
  gray = rng.uniform(35.0, 85.0) + smooth + noise
  return np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)


def _upsample_matrix(n_out, n_in):
  """(n_out, n_in) matrix that linearly interpolates n_in samples to n_out."""
  positions = np.linspace(0, n_in - 1, n_out)
  return np.stack([np.interp(positions, np.arange(n_in), basis) for basis in np.eye(n_in)], axis=1)


def random_vivid_color(rng):
  """A fully saturated, bright RGB color of uniformly random hue."""
  return 255.0 * np.array(colorsys.hsv_to_rgb(rng.uniform(), 1.0, rng.uniform(0.9, 1.0)))


def random_gray(rng, low=110.0, high=210.0):
  """An achromatic RGB color (distractors are gray so only targets are vivid)."""
  return np.full(3, rng.uniform(low, high))


def to_uint8(canvas):
  return np.clip(np.round(canvas), 0, 255).astype(np.uint8)
