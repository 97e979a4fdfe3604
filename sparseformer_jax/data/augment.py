"""Per-image (and per-clip) train and eval transforms (timm/DeiT recipe) as stateless TF ops.

Images arrive either encoded (a scalar tf.string, JPEG or PNG) or decoded
((H, W, 3) uint8, e.g. from a cache). A video clip ((T, H, W, 3) uint8) goes
through the same transforms with ONE set of random choices for all its
frames: one crop box, one flip, and the per-pixel stages (RandAugment, colour
jitter, erasing) run frame by frame with the same seed. Every random choice is
drawn from an explicit seed of shape (2,), so a transform is a pure function of
(image, seed). Train ('inception'): random-resized crop -> bicubic resize ->
horizontal flip -> RandAugment, or colour jitter when RandAugment is off
(as timm does) -> normalise -> random erasing. Eval: bicubic resize of the
short side to round(image_size / crop_pct) -> centre crop -> normalise.
Resizes are antialiased like PIL's.

Reads config.input fields: image_size, augment, crop_pct, mean, std, scale,
ratio, hflip, randaugment, color_jitter, reprob (their meaning and defaults:
trainer/config_schema.py base_config()).
"""

import math

import tensorflow as tf

from sparseformer_jax.data import randaugment

CROP_ATTEMPTS = 10                # timm RandomResizedCrop tries before falling back
ERASE_ATTEMPTS = 10               # timm RandomErasing tries
ERASE_AREA = (0.02, 1.0 / 3.0)    # erased fraction of the image area
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1.0 / 0.3))


# ------------------------------------------------------------ decode / resize

def _is_encoded(image) -> bool:
  return image.dtype == tf.string


def decode(image) -> tf.Tensor:
  """Full decode to (H, W, 3) uint8; decoded images pass through."""
  if not _is_encoded(image):
    return image
  return tf.io.decode_image(image, channels=3, expand_animations=False)


def resize_bicubic(image, size) -> tf.Tensor:
  """([T,] h, w, 3) uint8 -> ([T,] size[0], size[1], 3) uint8, antialiased bicubic."""
  resized = tf.image.resize(image, size, method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


# ---------------------------------------------------------------- random crops

def _uniform(seed, shape, low, high):
  return tf.random.stateless_uniform(shape, seed, low, high)


def _randint(seed, high_inclusive) -> tf.Tensor:
  """Uniform integer in [0, high_inclusive] (Python's random.randint)."""
  return tf.random.stateless_uniform([], seed, 0, high_inclusive + 1, dtype=tf.int32)


def _candidate_sizes(seed, area, area_range, log_ratio_range, attempts):
  """`attempts` (sqrt(a * r), sqrt(a / r)) rounded pairs, a ~ U(area_range) * area."""
  area_seed, ratio_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  target_area = area * _uniform(area_seed, [attempts], *area_range)
  aspect = tf.exp(_uniform(ratio_seed, [attempts], *log_ratio_range))
  return (tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32),
          tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32))


def _first(valid, values):
  """values[i] for the first True in `valid` (index 0 when none is)."""
  return tf.gather(values, tf.argmax(tf.cast(valid, tf.int32)))


def _fallback_crop_size(height, width, ratio):
  """timm's fallback: the central crop with aspect ratio clamped into `ratio`."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  aspect = w / h
  crop_w = tf.where(aspect < ratio[0], w, tf.where(aspect > ratio[1], tf.round(h * ratio[1]), w))
  crop_h = tf.where(aspect < ratio[0], tf.round(w / ratio[0]), h)
  return tf.cast(crop_h, tf.int32), tf.cast(crop_w, tf.int32)


def sample_crop_box(seed, shape, scale, ratio) -> tf.Tensor:
  """timm RandomResizedCrop box (top, left, height, width) for an image of `shape`."""
  height, width = tf.unstack(shape)
  size_seed, top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  area = tf.cast(height * width, tf.float32)
  widths, heights = _candidate_sizes(size_seed, area, scale, log_ratio, CROP_ATTEMPTS)
  valid = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
  found = tf.reduce_any(valid)
  fallback_h, fallback_w = _fallback_crop_size(height, width, ratio)
  crop_h = tf.where(found, _first(valid, heights), fallback_h)
  crop_w = tf.where(found, _first(valid, widths), fallback_w)
  top = tf.where(found, _randint(top_seed, height - crop_h), (height - crop_h) // 2)
  left = tf.where(found, _randint(left_seed, width - crop_w), (width - crop_w) // 2)
  return tf.stack([top, left, crop_h, crop_w])


def decode_and_random_crop(image, seed, scale, ratio) -> tf.Tensor:
  """timm's random crop as ([T,] h, w, 3) uint8; a JPEG is decoded only inside the crop.

  A clip (T, H, W, 3) gets one box for all its frames.
  """
  def crop(pixels):
    top, left, height, width = tf.unstack(
        sample_crop_box(seed, tf.shape(pixels)[-3:-1], scale, ratio))
    return pixels[..., top:top + height, left:left + width, :]

  def crop_jpeg():
    box = sample_crop_box(seed, tf.image.extract_jpeg_shape(image)[:2], scale, ratio)
    return tf.image.decode_and_crop_jpeg(image, box, channels=3)

  if not _is_encoded(image):
    return crop(image)
  return tf.cond(tf.io.is_jpeg(image), crop_jpeg, lambda: crop(decode(image)))


def random_resized_crop(image, seed, size, scale, ratio) -> tf.Tensor:
  """Encoded or decoded image (or clip) -> ([T,] size, size, 3) uint8 random-resized crop."""
  return resize_bicubic(decode_and_random_crop(image, seed, scale, ratio), [size, size])


def random_flip(image, seed, prob) -> tf.Tensor:
  """Mirrors an image or every frame of a clip left-right with probability `prob`."""
  flip = _uniform(seed, [], 0.0, 1.0) < prob
  return tf.cond(flip, lambda: tf.reverse(image, axis=[-2]), lambda: image)


def color_jitter(image, seed, strength) -> tf.Tensor:
  """torchvision ColorJitter(brightness, contrast, saturation = strength), random order."""
  order_seed, factor_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  factors = _uniform(factor_seed, [3], max(0.0, 1.0 - strength), 1.0 + strength)
  order = tf.random.experimental.stateless_shuffle(tf.range(3), order_seed)
  adjustments = (randaugment.adjust_brightness, randaugment.adjust_contrast,
                 randaugment.adjust_saturation)
  for step in range(3):
    branches = [lambda fn=fn, i=i: fn(image, factors[i]) for i, fn in enumerate(adjustments)]
    image = tf.switch_case(order[step], branches)
  return image


def _each_frame(transform, pixels, *args) -> tf.Tensor:
  """transform(image, *args) on an image (H, W, C), or on every frame of a clip (T, H, W, C).

  The frames share `args` (and so the seed): a clip gets one augmentation, not T.
  """
  if pixels.shape.rank == 3:
    return transform(pixels, *args)
  return tf.map_fn(lambda frame: transform(frame, *args), pixels)


def normalize(image, mean, std) -> tf.Tensor:
  """uint8 pixels -> float32 (x / 255 - mean) / std, mean and std in [0, 1] units."""
  scale = 255.0 * tf.constant(std, tf.float32)
  return (tf.cast(image, tf.float32) - 255.0 * tf.constant(mean, tf.float32)) / scale


def random_erasing(image, seed, prob) -> tf.Tensor:
  """timm RandomErasing(mode='pixel'): with probability `prob` one box of N(0, 1) noise.

  `image` is normalised float32 (H, W, C) with a static shape.
  """
  height, width, channels = image.shape
  apply_seed, size_seed, top_seed, left_seed, noise_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 5))
  box_h, box_w = _candidate_sizes(size_seed, float(height * width), ERASE_AREA,
                                  ERASE_LOG_ASPECT, ERASE_ATTEMPTS)
  valid = (box_w < width) & (box_h < height)
  box_h, box_w = _first(valid, box_h), _first(valid, box_w)
  top = _randint(top_seed, tf.maximum(height - box_h, 0))  # unused when nothing fits
  left = _randint(left_seed, tf.maximum(width - box_w, 0))
  erase = (_uniform(apply_seed, [], 0.0, 1.0) < prob) & tf.reduce_any(valid)

  def paste_noise():
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    noise = tf.random.stateless_normal([height, width, channels], noise_seed)
    return tf.where(inside[..., None], noise, image)

  return tf.cond(erase, paste_noise, lambda: image)  # noise only when erasing


# ----------------------------------------------------------------- transforms

def resize_short_side(image, short_side) -> tf.Tensor:
  """torchvision Resize(int): short side -> `short_side`, long side int(long * ratio)."""
  shape = tf.shape(image)[-3:-1]
  scaled = tf.cast(tf.cast(shape, tf.float64) * short_side
                   / tf.cast(tf.reduce_min(shape), tf.float64), tf.int32)
  new_shape = tf.where(shape == tf.reduce_min(shape), short_side, scaled)
  return resize_bicubic(image, new_shape)


def center_crop(image, size) -> tf.Tensor:
  """([T,] H, W, 3) -> ([T,] size, size, 3), the centred square."""
  height, width = tf.unstack(tf.shape(image)[-3:-1])
  top = tf.cast(tf.round((height - size) / 2), tf.int32)
  left = tf.cast(tf.round((width - size) / 2), tf.int32)
  return tf.ensure_shape(image[..., top:top + size, left:left + size, :],
                         image.shape[:-3].concatenate([size, size, 3]))


def eval_transform(image, input_config) -> tf.Tensor:
  """Deterministic: resize short side to floor(size / crop_pct), centre crop, normalise.

  floor as the official eval (int(256 / 224 * size)) and timm (floor(size / crop_pct)).
  Image -> (size, size, 3) float32; clip (T, H, W, 3) uint8 -> (T, size, size, 3).
  """
  size = input_config.image_size
  resize_to = math.floor(size / input_config.crop_pct)
  image = center_crop(resize_short_side(decode(image), resize_to), size)
  return normalize(image, input_config.mean, input_config.std)


def _color_augment(image, seed, input_config) -> tf.Tensor:
  """RandAugment if configured, else colour jitter (timm disables jitter with RandAugment)."""
  spec = input_config.randaugment
  if spec:
    fill = tuple(min(255, round(255 * m)) for m in input_config.mean)  # timm: the mean colour
    return randaugment.rand_augment(image, seed, randaugment.parse_randaugment(spec), fill)
  strength = input_config.color_jitter
  return color_jitter(image, seed, strength) if strength else image


def train_transform(image, seed, input_config) -> tf.Tensor:
  """Encoded/decoded image + seed (2,) -> normalised float32 (size, size, 3).

  A clip (T, H, W, 3) uint8 -> (T, size, size, 3), the same augmentation on every frame.
  """
  mode = input_config.augment  # 'inception' | 'light' | 'none', checked by the config schema
  if mode == 'none':
    return eval_transform(image, input_config)
  crop_seed, flip_seed, color_seed, erase_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  image = random_resized_crop(image, crop_seed, input_config.image_size,
                              tuple(input_config.scale), tuple(input_config.ratio))
  image = random_flip(image, flip_seed, input_config.hflip)
  if mode == 'inception':
    image = _each_frame(_color_augment, image, color_seed, input_config)
  image = normalize(image, input_config.mean, input_config.std)
  if mode == 'inception' and input_config.reprob > 0:
    image = _each_frame(random_erasing, image, erase_seed, input_config.reprob)
  return image
