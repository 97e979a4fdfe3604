"""RandAugment: spec parsing, the seeded op plan, and op semantics against PIL."""

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from sparseformer_jax.data import randaugment as ra

FILL = (124, 116, 104)
SPEC = ra.parse_randaugment('rand-m9-mstd0.5-inc1')


def _random_image(seed=0, shape=(24, 20, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _smooth_image():
  y, x = np.mgrid[0:24, 0:20]
  return np.stack([x * 10 + 20, y * 8 + 30, (x + y) * 5 + 10], -1).astype(np.uint8)


def test_parse_timm_spec():
  assert SPEC == ra.RandAugmentSpec(magnitude=9.0, num_layers=2, magnitude_std=0.5,
                                    magnitude_max=10.0, increasing=True, prob=0.5)
  assert ra.parse_randaugment('rand-n3-m5-mmax8-p1.0') == ra.RandAugmentSpec(
      magnitude=5.0, num_layers=3, magnitude_max=8.0, prob=1.0)
  assert len(ra.op_names(SPEC)) == 15 and 'PosterizeIncreasing' in ra.op_names(SPEC)
  assert 'Posterize' in ra.op_names(ra.parse_randaugment('rand-m9'))


@pytest.mark.parametrize('bad', ['m9', 'rand', 'rand-x3-m9', 'rand-mstd0.5', 'rand-m'])
def test_parse_rejects_bad_specs(bad):
  with pytest.raises(ValueError, match='RandAugment'):
    ra.parse_randaugment(bad)


def test_plan_draws_two_ops_applied_with_probability_half():
  plans = [ra.randaugment_plan(tf.constant([s, 7]), SPEC) for s in range(300)]
  op_index = np.stack([p.op_index.numpy() for p in plans])
  applied = np.stack([p.applied.numpy() for p in plans])
  magnitude = np.stack([p.magnitude.numpy() for p in plans])
  assert op_index.shape == applied.shape == magnitude.shape == (300, 2)
  assert set(op_index.ravel()) == set(range(15))        # uniform over all 15 ops
  assert 0.42 < applied.mean() < 0.58                   # each op with p = 0.5
  assert magnitude.min() >= 0 and magnitude.max() <= 10
  assert abs(magnitude.mean() - 9.0) < 0.1 and 0.4 < magnitude.std() < 0.6
  again = ra.randaugment_plan(tf.constant([3, 7]), SPEC)
  np.testing.assert_array_equal(again.op_index, op_index[3])  # pure function of the seed


def test_rand_augment_runs_exactly_the_planned_ops():
  image = _random_image()
  counts = set()
  for s in range(12):
    seed = tf.constant([s, 1])
    plan = ra.randaugment_plan(seed, SPEC)
    expected = tf.constant(image)
    for i in np.flatnonzero(plan.applied.numpy()):
      expected = ra.apply_op(expected, plan.op_index[i], plan.magnitude[i],
                             plan.negate[i], SPEC, FILL)
    counts.add(int(plan.applied.numpy().sum()))
    out = ra.rand_augment(tf.constant(image), seed, SPEC, FILL)
    assert out.dtype == tf.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, expected)
  assert counts == {0, 1, 2}


def _pil(image):
  return Image.fromarray(image)


def _solarize_add_pil(image, addition):
  lut = [min(255, i + addition) if i < 128 else i for i in range(256)] * 3
  return _pil(image).point(lut)


def _enhance(enhancer, factor):
  return lambda pil: enhancer(pil).enhance(factor)


PIXEL_OPS = [  # (name, our op, its argument, PIL reference)
    ('auto_contrast', ra.auto_contrast, 0.0, ImageOps.autocontrast),
    ('equalize', ra.equalize, 0.0, ImageOps.equalize),
    ('invert', ra.invert, 0.0, ImageOps.invert),
    ('posterize', ra.posterize, 3.0, lambda pil: ImageOps.posterize(pil, 3)),
    ('solarize', ra.solarize, 100.0, lambda pil: ImageOps.solarize(pil, 100)),
    ('color', ra.adjust_saturation, 0.3, _enhance(ImageEnhance.Color, 0.3)),
    ('contrast', ra.adjust_contrast, 1.6, _enhance(ImageEnhance.Contrast, 1.6)),
    ('brightness', ra.adjust_brightness, 1.6, _enhance(ImageEnhance.Brightness, 1.6)),
    ('sharpness', ra.adjust_sharpness, 0.2, _enhance(ImageEnhance.Sharpness, 0.2)),
]


@pytest.mark.parametrize('name,op,arg,pil', PIXEL_OPS, ids=[op[0] for op in PIXEL_OPS])
def test_pixel_ops_match_pil(name, op, arg, pil):
  for image in (_random_image(), _smooth_image()):
    out = np.asarray(op(tf.constant(image), arg), np.int32)
    np.testing.assert_allclose(out, np.asarray(pil(_pil(image)), np.int32), atol=1, err_msg=name)


def test_solarize_add_and_posterize_to_zero_bits_match_pil():
  image = _random_image()
  np.testing.assert_array_equal(ra.solarize_add(image, 60.0), _solarize_add_pil(image, 60))
  np.testing.assert_array_equal(ra.posterize(image, 0.0), np.zeros_like(image))


def _affine(matrix):
  return lambda pil: pil.transform(pil.size, Image.AFFINE, matrix, Image.BILINEAR, fillcolor=FILL)


GEOMETRIC_OPS = [  # (name, our op, its argument, PIL reference); images are 20 wide, 24 high
    ('rotate', ra.rotate, 20.0, lambda pil: pil.rotate(20, Image.BILINEAR, fillcolor=FILL)),
    ('shear_x', ra.shear_x, 0.2, _affine((1, 0.2, 0, 0, 1, 0))),
    ('shear_y', ra.shear_y, -0.2, _affine((1, 0, 0, -0.2, 1, 0))),
    ('translate_x', ra.translate_x, 0.3, _affine((1, 0, 6, 0, 1, 0))),
    ('translate_y', ra.translate_y, -0.25, _affine((1, 0, 0, 0, 1, -6))),
]


@pytest.mark.parametrize('name,op,arg,pil', GEOMETRIC_OPS, ids=[op[0] for op in GEOMETRIC_OPS])
def test_geometric_ops_match_pil_up_to_edge_interpolation(name, op, arg, pil):
  image = _smooth_image()
  out = np.asarray(op(tf.constant(image), arg, FILL), np.int32)
  diff = np.abs(out - np.asarray(pil(_pil(image)), np.int32))
  assert diff.mean() < 2.0, name  # PIL does not blend the fill colour at the edges


def test_increasing_ops_get_harsher_with_magnitude():
  image = tf.constant(_random_image())
  names = ra.op_names(SPEC)
  ops = {name: names.index(name)
         for name in ('PosterizeIncreasing', 'SolarizeIncreasing', 'BrightnessIncreasing')}

  def change(name, magnitude):
    out = ra.apply_op(image, tf.constant(ops[name]), tf.constant(magnitude),
                      tf.constant(False), SPEC, FILL)
    return np.abs(out.numpy().astype(int) - image.numpy()).mean()

  for name in ops:
    assert change(name, 2.0) < change(name, 9.0), name
