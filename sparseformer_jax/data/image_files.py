"""Image files from disk as RGB uint8 arrays: the one reader for predict, visualize and folders.

Photos come in every mode PIL knows: grayscale, RGBA, palette (with transparency), CMYK JPEGs,
16-bit PNGs/TIFFs, and with an EXIF orientation that cameras set instead of rotating pixels. All
of them become (H, W, 3) uint8 RGB, upright, as a person sees the file. A file that is not an
image, is empty or is cut short raises `UnreadableImageError` naming the file and the reason.
"""
import os
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What the folder tools pick up; anything else in a folder (.txt, .json, ...) is not an image.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp', '.tif', '.tiff')


class UnreadableImageError(ValueError):
  """A file that cannot be decoded as an image; the message names the file and why."""


def _to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB. 16/32-bit channels are scaled down to 8 bits, never clipped."""
  if image.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
    pixels = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith('I;16') or pixels.max() > 255 else 255.0
    image = Image.fromarray(np.round(pixels * (255.0 / top)).clip(0, 255).astype(np.uint8))
  elif image.mode == 'F':
    pixels = np.asarray(image, dtype=np.float64)
    top = 1.0 if pixels.max() <= 1.0 else 255.0
    image = Image.fromarray(np.round(pixels * (255.0 / top)).clip(0, 255).astype(np.uint8))
  elif image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')  # PIL warns when a palette with transparency goes to RGB
  if image.mode in ('RGBA', 'LA', 'PA'):
    background = Image.new('RGBA', image.size, (255, 255, 255, 255))  # transparent -> white
    image = Image.alpha_composite(background, image.convert('RGBA'))
  return image.convert('RGB')


def load_rgb(path: str, max_side: Optional[int] = None) -> np.ndarray:
  """The image at `path` as (H, W, 3) uint8 RGB, EXIF-upright; larger than `max_side` pixels on
  its longer side -> downscaled (bicubic, aspect kept). Raises UnreadableImageError."""
  try:
    if os.path.getsize(path) == 0:
      raise UnreadableImageError(f'{path}: the file is empty (0 bytes).')
    with Image.open(path) as image:
      image.load()  # decodes now: a truncated file fails here, not later
      image = _to_rgb(ImageOps.exif_transpose(image))
  except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
          ValueError) as e:
    if isinstance(e, UnreadableImageError):
      raise
    reason = 'not an image PIL can read' if isinstance(e, UnidentifiedImageError) else str(e)
    raise UnreadableImageError(f'{path}: {reason}.') from e
  if max_side and max(image.size) > max_side:
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
  return np.asarray(image, dtype=np.uint8)


def is_image_name(name: str) -> bool:
  """Not hidden (no leading '.'), with one of IMAGE_EXTENSIONS (any case)."""
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(path: str) -> Iterator[str]:
  """`path` itself if it is a file, else the image files below it (sorted, hidden ones skipped)."""
  if os.path.isfile(path):
    yield path
    return
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in sorted(files):
      if is_image_name(name):
        yield os.path.join(root, name)
