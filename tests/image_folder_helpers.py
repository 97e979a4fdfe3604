"""A generated folder of images with every kind of file a real one holds (for the folder tests).

Three easy classes (solid red, green, blue with a little noise), plus files that must be
converted (grayscale, RGBA, CMYK, 16-bit, 1x1, 6000x6000, a name with spaces and non-ASCII) or
skipped (truncated, zero bytes, text named .jpg, a .txt), a hidden file and an empty class folder.
"""
import os
import pathlib

import numpy as np
from PIL import Image

COLOURS = {'blue': (30, 40, 220), 'green': (40, 200, 50), 'red': (220, 30, 40)}
# Files that cannot be read, by path in the folder: they must be skipped and reported.
UNREADABLE = ('green/cut.jpg', 'blue/empty.png', 'green/not_really.jpg', 'red/notes.txt')


def _solid(colour, rng, size=(40, 48)):
  noise = rng.integers(-12, 13, size + (3,))
  return np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)


def write_folder(root, per_class: int = 8, seed: int = 0, special: bool = True) -> list:
  """Writes the class folders into `root`; returns the paths (in `root`) of readable images."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  readable = []
  for name, colour in COLOURS.items():
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      ext = 'jpg' if i % 2 else 'png'
      Image.fromarray(_solid(colour, rng)).save(root / name / f'{i}.{ext}')
      readable.append(f'{name}/{i}.{ext}')
  if not special:
    return sorted(readable)
  red, green, blue = (np.array(COLOURS[c], np.uint8) for c in ('red', 'green', 'blue'))
  converted = {
      'red/gray.png': Image.fromarray(_solid(COLOURS['red'], rng)).convert('L'),
      'green/rgba.png': Image.fromarray(np.dstack([np.broadcast_to(green, (20, 20, 3)),
                                                   np.full((20, 20), 255, np.uint8)])),
      'blue/cmyk.jpg': Image.fromarray(np.broadcast_to(blue, (24, 24, 3)).copy()).convert('CMYK'),
      'red/deep.png': Image.fromarray(np.full((16, 16), 50_000, np.uint16)),
      'blue/tiny.png': Image.fromarray(blue[None, None]),
      'red/huge.png': Image.fromarray(np.broadcast_to(red, (6000, 6000, 3)).copy()),
      'green/a photo é ü.jpg': Image.fromarray(_solid(COLOURS['green'], rng)),
  }
  for path, image in converted.items():
    image.save(root / path)
    readable.append(path)
  jpeg = (root / 'green' / '1.jpg').read_bytes()
  (root / 'green' / 'cut.jpg').write_bytes(jpeg[:len(jpeg) // 3])
  (root / 'blue' / 'empty.png').write_bytes(b'')
  (root / 'green' / 'not_really.jpg').write_text('this is text')
  (root / 'red' / 'notes.txt').write_text('labels are the folder names')
  (root / 'red' / '.hidden.png').write_bytes(b'')  # hidden: ignored, not reported
  (root / 'empty_class').mkdir()
  return sorted(readable)


def file_names(data_dir, name: str, split: str) -> list:
  """The file_name feature of every example of a prepared split."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=os.fspath(data_dir))
  return sorted(e['file_name'].decode() for e in tfds.as_numpy(builder.as_dataset(split=split)))
