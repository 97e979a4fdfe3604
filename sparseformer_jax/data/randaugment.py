"""RandAugment on uint8 images with timm's semantics, as stateless TF ops.

A spec string such as 'rand-m9-mstd0.5-inc1' means (timm's grammar):
  m: magnitude on the 0..10 scale;   n: ops per image (default 2);
  mstd: per-op gaussian std of the magnitude (> 100 means uniform in [0, m]);
  mmax: magnitude clip (default 10);  inc: 1 = increasing-severity op set;
  p: probability that each chosen op is applied (default 0.5).
Ops are drawn uniformly with replacement; every op's arguments are computed
from its magnitude as timm does. Differences from timm's PIL code: geometric
ops interpolate bilinearly (TF has no bicubic affine warp) and pixel rounding
may differ by 1.

`randaugment_plan` is a pure function of the seed that says which ops run;
`rand_augment` executes exactly that plan, so tests can inspect it.
"""

import dataclasses
import math
from typing import Callable, NamedTuple

import tensorflow as tf

MAX_MAGNITUDE = 10.0        # timm's level denominator: magnitudes live in [0, 10]
ROTATE_MAX_DEGREES = 30.0
SHEAR_MAX = 0.3
TRANSLATE_MAX_FRACTION = 0.45  # of the image side, timm's translate_pct
ENHANCE_INCREASING_RANGE = 0.9  # factor in 1 +- 0.9
ENHANCE_MIN, ENHANCE_SPAN = 0.1, 1.8  # non-increasing factor in [0.1, 1.9]
POSTERIZE_MAX_BITS_REMOVED = 4
SOLARIZE_ADD_MAX = 110.0
SOLARIZE_ADD_THRESHOLD = 128.0
UNIFORM_MAGNITUDE_STD = 100.0   # mstd above this means "uniform in [0, m]"
SMOOTH_KERNEL = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))  # PIL SMOOTH, / 13


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """Parsed RandAugment spec string."""
  magnitude: float
  num_layers: int = 2
  magnitude_std: float = 0.0
  magnitude_max: float = MAX_MAGNITUDE
  increasing: bool = False
  prob: float = 0.5


_SPEC_KEYS = {'m': 'magnitude', 'n': 'num_layers', 'mstd': 'magnitude_std',
              'mmax': 'magnitude_max', 'inc': 'increasing', 'p': 'prob'}


def parse_randaugment(spec: str) -> RandAugmentSpec:
  """Parses a timm RandAugment string like 'rand-m9-mstd0.5-inc1'."""
  parts = spec.split('-')
  if parts[0] != 'rand' or len(parts) < 2:
    raise ValueError(f"RandAugment spec {spec!r} must look like 'rand-m9-mstd0.5-inc1'.")
  fields = {}
  for part in parts[1:]:
    key = part.rstrip('0123456789.')
    if key not in _SPEC_KEYS or key == part:
      raise ValueError(f'Unknown RandAugment field {part!r} in {spec!r}; '
                       f'expected one of {sorted(_SPEC_KEYS)} followed by a number.')
    fields[_SPEC_KEYS[key]] = float(part[len(key):])
  if 'magnitude' not in fields:
    raise ValueError(f"RandAugment spec {spec!r} needs a magnitude, e.g. 'm9'.")
  for key, kind in (('increasing', bool), ('num_layers', int)):
    if key in fields:
      fields[key] = kind(fields[key])
  return RandAugmentSpec(**fields)


# ---------------------------------------------------------------- pixel helpers

def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  """Clips and truncates float pixels to uint8, as PIL does."""
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL 'L' conversion: (H, W, 3) uint8 -> (H, W, 1) float32 of rounded luma."""
  weights = tf.constant([0.299, 0.587, 0.114])
  return tf.round(tf.reduce_sum(tf.cast(image, tf.float32) * weights, -1, keepdims=True))


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), as uint8."""
  degenerate = tf.cast(degenerate, tf.float32)
  return _to_uint8(degenerate + factor * (tf.cast(image, tf.float32) - degenerate))


def adjust_saturation(image, factor):
  """PIL ImageEnhance.Color: blend with the grayscale image."""
  return blend(_grayscale(image), image, factor)


def adjust_contrast(image, factor):
  """PIL ImageEnhance.Contrast: blend with the rounded mean gray level."""
  return blend(tf.round(tf.reduce_mean(_grayscale(image))), image, factor)


def adjust_brightness(image, factor):
  """PIL ImageEnhance.Brightness: blend with black."""
  return blend(tf.zeros_like(image), image, factor)


def adjust_sharpness(image, factor):
  """PIL ImageEnhance.Sharpness: blend with a 3x3-smoothed copy (borders kept)."""
  kernel = tf.constant(SMOOTH_KERNEL) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])  # (3, 3, C, 1)
  smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel,
                                  strides=[1, 1, 1, 1], padding='VALID')[0]
  smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]]) > 0
  degenerate = tf.where(interior, smooth, tf.cast(image, tf.float32))
  return blend(degenerate, image, factor)


def auto_contrast(image, _):
  """Stretches each channel to the full 0..255 range (PIL autocontrast)."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  stretched = tf.floor((x - lo) * 255.0 / tf.maximum(hi - lo, 1.0))
  return _to_uint8(tf.where(hi > lo, stretched, x))


def equalize(image, _):
  """Per-channel histogram equalisation (PIL ImageOps.equalize)."""
  channels = tf.transpose(tf.reshape(tf.cast(image, tf.int32), [-1, 3]))  # (3, HW)
  hist = tf.math.bincount(channels, minlength=256, maxlength=256, axis=-1)  # (3, 256)
  last_count = tf.gather(hist, tf.reduce_max(channels, axis=1), batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last_count) // 255  # (3,)
  lut = (tf.cumsum(hist, axis=1, exclusive=True) + (step // 2)[:, None])
  lut = tf.minimum(lut // tf.maximum(step, 1)[:, None], 255)
  equalized = tf.gather(lut, channels, batch_dims=1)
  out = tf.where(step[:, None] > 0, equalized, channels)
  return tf.cast(tf.reshape(tf.transpose(out), tf.shape(image)), tf.uint8)


def invert(image, _):
  return 255 - image


def posterize(image, bits):
  """Keeps the `bits` most significant bits of every pixel."""
  shift = 8 - tf.cast(bits, tf.int32)
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.uint8)


def solarize(image, threshold):
  """Inverts pixels at or above `threshold`."""
  return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def solarize_add(image, addition):
  """Adds `addition` to pixels below 128, saturating at 255."""
  x = tf.cast(image, tf.float32)
  return _to_uint8(tf.where(x < SOLARIZE_ADD_THRESHOLD, x + addition, x))


def affine_transform(image, matrix, fill):
  """Warps with a 2x3 output->input matrix (PIL convention), filling with `fill`.

  A ones channel is warped along so that pixels coming from outside the image
  blend into the per-channel fill colour.
  """
  x = tf.cast(image, tf.float32)
  x = tf.concat([x, tf.ones_like(x[..., :1])], axis=-1)[None]  # (1, H, W, 4)
  transform = tf.concat([tf.reshape(tf.cast(matrix, tf.float32), [6]), tf.zeros([2])], 0)
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=x, transforms=transform[None], output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation='BILINEAR', fill_mode='CONSTANT')[0]
  coverage = warped[..., 3:]
  return _to_uint8(warped[..., :3] + (1.0 - coverage) * tf.constant(fill, tf.float32))


def rotate(image, degrees, fill):
  """Rotates counter-clockwise by `degrees` about the image centre."""
  height, width = (tf.cast(d, tf.float32) for d in tf.unstack(tf.shape(image)[:2]))
  theta = degrees * math.pi / 180.0
  cos, sin = tf.cos(theta), tf.sin(theta)
  cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
  matrix = [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]
  return affine_transform(image, tf.stack(matrix), fill)


def shear_x(image, shear, fill):
  return affine_transform(image, [1.0, shear, 0.0, 0.0, 1.0, 0.0], fill)


def shear_y(image, shear, fill):
  return affine_transform(image, [1.0, 0.0, 0.0, shear, 1.0, 0.0], fill)


def translate_x(image, fraction, fill):
  pixels = fraction * tf.cast(tf.shape(image)[1], tf.float32)
  return affine_transform(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]), fill)


def translate_y(image, fraction, fill):
  pixels = fraction * tf.cast(tf.shape(image)[0], tf.float32)
  return affine_transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]), fill)


# --------------------------------------------------------- magnitude -> argument

def _signed(value, negate):
  return tf.where(negate, -value, value)


def _no_arg(magnitude, negate):
  del negate
  return tf.zeros_like(magnitude)


def _rotate_arg(magnitude, negate):
  return _signed(magnitude / MAX_MAGNITUDE * ROTATE_MAX_DEGREES, negate)


def _shear_arg(magnitude, negate):
  return _signed(magnitude / MAX_MAGNITUDE * SHEAR_MAX, negate)


def _translate_arg(magnitude, negate):
  return _signed(magnitude / MAX_MAGNITUDE * TRANSLATE_MAX_FRACTION, negate)


def _enhance_arg(magnitude, negate):
  del negate
  return magnitude / MAX_MAGNITUDE * ENHANCE_SPAN + ENHANCE_MIN


def _enhance_increasing_arg(magnitude, negate):
  return 1.0 + _signed(magnitude / MAX_MAGNITUDE * ENHANCE_INCREASING_RANGE, negate)


def _posterize_arg(magnitude, negate):
  del negate
  return tf.floor(magnitude / MAX_MAGNITUDE * POSTERIZE_MAX_BITS_REMOVED)


def _posterize_increasing_arg(magnitude, negate):
  return POSTERIZE_MAX_BITS_REMOVED - _posterize_arg(magnitude, negate)


def _solarize_arg(magnitude, negate):
  del negate
  return tf.floor(magnitude / MAX_MAGNITUDE * 256.0)


def _solarize_increasing_arg(magnitude, negate):
  return 256.0 - _solarize_arg(magnitude, negate)


def _solarize_add_arg(magnitude, negate):
  del negate
  return tf.floor(magnitude / MAX_MAGNITUDE * SOLARIZE_ADD_MAX)


class RandAugmentOp(NamedTuple):
  name: str
  apply: Callable      # (uint8 image, argument, fill) -> uint8 image
  argument: Callable   # (magnitude, negate) -> argument


def _pixel_op(fn):
  """Adapts an op without a fill colour to the (image, arg, fill) signature."""
  return lambda image, arg, fill: fn(image, arg)


def _severity_op(name, fn, argument, increasing_argument, increasing):
  """An op whose timm variant 'NameIncreasing' maps magnitude to severity monotonically."""
  if increasing:
    return RandAugmentOp(name + 'Increasing', _pixel_op(fn), increasing_argument)
  return RandAugmentOp(name, _pixel_op(fn), argument)


def _ops(increasing: bool) -> tuple[RandAugmentOp, ...]:
  """timm's _RAND_INCREASING_TRANSFORMS (or _RAND_TRANSFORMS), in its order."""
  enhance = (_enhance_arg, _enhance_increasing_arg, increasing)
  return (
      RandAugmentOp('AutoContrast', _pixel_op(auto_contrast), _no_arg),
      RandAugmentOp('Equalize', _pixel_op(equalize), _no_arg),
      RandAugmentOp('Invert', _pixel_op(invert), _no_arg),
      RandAugmentOp('Rotate', rotate, _rotate_arg),
      _severity_op('Posterize', posterize, _posterize_arg, _posterize_increasing_arg,
                   increasing),
      _severity_op('Solarize', solarize, _solarize_arg, _solarize_increasing_arg, increasing),
      RandAugmentOp('SolarizeAdd', _pixel_op(solarize_add), _solarize_add_arg),
      _severity_op('Color', adjust_saturation, *enhance),
      _severity_op('Contrast', adjust_contrast, *enhance),
      _severity_op('Brightness', adjust_brightness, *enhance),
      _severity_op('Sharpness', adjust_sharpness, *enhance),
      RandAugmentOp('ShearX', shear_x, _shear_arg),
      RandAugmentOp('ShearY', shear_y, _shear_arg),
      RandAugmentOp('TranslateXRel', translate_x, _translate_arg),
      RandAugmentOp('TranslateYRel', translate_y, _translate_arg),
  )


def op_names(spec: RandAugmentSpec) -> tuple[str, ...]:
  return tuple(op.name for op in _ops(spec.increasing))


# ------------------------------------------------------------------ plan / apply

class RandAugmentPlan(NamedTuple):
  """Which ops run on one image; every field has shape (num_layers,)."""
  op_index: tf.Tensor   # int32, index into op_names(spec)
  applied: tf.Tensor    # bool, False = op drawn but skipped (prob 1 - p)
  magnitude: tf.Tensor  # float32 in [0, magnitude_max]
  negate: tf.Tensor     # bool, sign flip for signed arguments


def _sample_magnitudes(seed, spec: RandAugmentSpec) -> tf.Tensor:
  n = spec.num_layers
  if spec.magnitude_std > UNIFORM_MAGNITUDE_STD:
    magnitude = tf.random.stateless_uniform([n], seed, 0.0, spec.magnitude)
  else:
    magnitude = spec.magnitude + spec.magnitude_std * tf.random.stateless_normal([n], seed)
  return tf.clip_by_value(magnitude, 0.0, spec.magnitude_max)


def randaugment_plan(seed, spec: RandAugmentSpec) -> RandAugmentPlan:
  """Draws the ops, their on/off coin, magnitudes and signs from `seed`."""
  op_seed, apply_seed, magnitude_seed, sign_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  n = spec.num_layers
  return RandAugmentPlan(
      op_index=tf.random.stateless_uniform([n], op_seed, 0, len(_ops(spec.increasing)),
                                           dtype=tf.int32),
      applied=tf.random.stateless_uniform([n], apply_seed) < spec.prob,
      magnitude=_sample_magnitudes(magnitude_seed, spec),
      negate=tf.random.stateless_uniform([n], sign_seed) < 0.5)


def apply_op(image, op_index, magnitude, negate, spec: RandAugmentSpec, fill):
  """Runs op number `op_index` (a tensor) at the given magnitude and sign."""
  branches = [
      (lambda op=op: op.apply(image, op.argument(magnitude, negate), fill))
      for op in _ops(spec.increasing)
  ]
  return tf.switch_case(op_index, branches)


def rand_augment(image, seed, spec: RandAugmentSpec, fill) -> tf.Tensor:
  """(H, W, 3) uint8 -> (H, W, 3) uint8 after the ops of randaugment_plan(seed)."""
  plan = randaugment_plan(seed, spec)
  for i in range(spec.num_layers):
    image = tf.cond(
        plan.applied[i],
        lambda i=i: apply_op(image, plan.op_index[i], plan.magnitude[i],
                             plan.negate[i], spec, fill),
        lambda: image)
  return image
