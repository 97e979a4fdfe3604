"""Reading image files: every mode becomes upright 8-bit RGB; broken files raise a clear error."""
import numpy as np
import pytest
from PIL import Image

from sparseformer_jax.data import image_files


def _save(tmp_path, name, image, **kwargs):
  path = tmp_path / name
  image.save(path, **kwargs)
  return str(path)


def test_modes_become_rgb(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
  gray = Image.fromarray(rgb[..., 0])
  cases = {
      'gray.png': gray,
      'rgba.png': Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])),
      'palette.gif': Image.fromarray(rgb).convert('P'),
      'cmyk.jpg': Image.fromarray(rgb).convert('CMYK'),
      'plain.bmp': Image.fromarray(rgb),
      'plain.webp': Image.fromarray(rgb),
      'plain.tiff': Image.fromarray(rgb),
  }
  for name, image in cases.items():
    out = image_files.load_rgb(_save(tmp_path, name, image))
    assert out.shape == (12, 20, 3) and out.dtype == np.uint8, name
  np.testing.assert_array_equal(image_files.load_rgb(str(tmp_path / 'plain.bmp')), rgb)
  out = image_files.load_rgb(str(tmp_path / 'gray.png'))
  np.testing.assert_array_equal(out[..., 1], rgb[..., 0])


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
  levels = (np.arange(64, dtype=np.uint16) * 1024).reshape(8, 8)  # 0 .. 64512
  path = _save(tmp_path, 'deep.png', Image.fromarray(levels))
  out = image_files.load_rgb(path)
  np.testing.assert_array_equal(out[..., 0], np.round(levels / 65535 * 255).astype(np.uint8))
  assert out.min() == 0 and 200 < out.max() < 255   # a white picture would be all 255


def test_transparent_pixels_become_white(tmp_path):
  rgba = np.zeros((4, 4, 4), np.uint8)   # fully transparent black
  out = image_files.load_rgb(_save(tmp_path, 'clear.png', Image.fromarray(rgba)))
  assert (out == 255).all()


def test_exif_orientation_is_applied(tmp_path):
  image = Image.fromarray(np.zeros((10, 30, 3), np.uint8))   # 30 wide, 10 high
  exif = Image.Exif()
  exif[0x0112] = 6   # "rotate 90 CW to display"
  out = image_files.load_rgb(_save(tmp_path, 'rot.jpg', image, exif=exif))
  assert out.shape == (30, 10, 3)


def test_max_side_keeps_the_aspect(tmp_path):
  path = _save(tmp_path, 'big.png', Image.fromarray(np.zeros((300, 600, 3), np.uint8)))
  assert image_files.load_rgb(path, max_side=100).shape == (50, 100, 3)
  assert image_files.load_rgb(path, max_side=1000).shape == (300, 600, 3)


@pytest.mark.parametrize('content, reason', [(b'', 'empty'), (b'hello, not an image', 'not an image'),
                                             (None, 'truncated')])
def test_unreadable_files_name_the_file(tmp_path, content, reason):
  path = tmp_path / 'bad.jpg'
  if content is None:   # a JPEG cut off after its first bytes
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path, quality=95)
    content = path.read_bytes()[:200]
  path.write_bytes(content)
  with pytest.raises(image_files.UnreadableImageError, match='bad.jpg') as info:
    image_files.load_rgb(str(path))
  assert reason.split()[0] in str(info.value).lower() or 'truncated' in str(info.value).lower()


def test_listing_skips_hidden_and_non_images(tmp_path):
  (tmp_path / 'a b é').mkdir()
  for name in ('a b é/x.JPG', 'a b é/.hidden.png', 'notes.txt', 'y.png'):
    (tmp_path / name).write_bytes(b'')
  (tmp_path / '.git').mkdir()
  (tmp_path / '.git' / 'z.png').write_bytes(b'')
  found = [p[len(str(tmp_path)) + 1:] for p in image_files.list_image_files(str(tmp_path))]
  assert found == ['y.png', 'a b é/x.JPG']   # a folder's own files, then its sub-folders
  assert list(image_files.list_image_files(str(tmp_path / 'y.png'))) == [str(tmp_path / 'y.png')]
