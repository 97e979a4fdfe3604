"""`synthetic_objects`: a locally generated image-classification dataset.

Each image is a textured gray canvas with one small *target* object, the only
vividly colored one, at a random position among several gray distractor
objects. The label is the target's shape (10 classes, chance 10%); distractor
shapes, all colors and all positions are independent of it, so a model must
find the target and recognise its shape, which is what SparseFormer's movable
regions of interest are for. Importing this module registers the builder:

  import sparseformer_jax.data.synthetic_objects
  builder = tfds.builder('synthetic_objects/smoke', data_dir=...)
  builder.download_and_prepare()  # generates locally, no network

(TFDS 4.9.10 ships with its GCS bucket disabled, so nothing is fetched; a
TFDS that probes the bucket can be stopped with download_config=
tfds.download.DownloadConfig(try_download_gcs=False).)

Examples are a pure function of (config.seed, split, index), so every build
produces the same data. Difficulty knobs live in `SyntheticObjectsConfig`.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from sparseformer_jax.data import shapes

_SPLIT_IDS = {'train': 0, 'validation': 1}
_PLACEMENT_ATTEMPTS = 20  # tries to place a distractor clear of the target


@dataclasses.dataclass(eq=False)
class SyntheticObjectsConfig(tfds.core.BuilderConfig):
  """Difficulty and size knobs of `synthetic_objects`.

  Attributes:
    canvas_size: side of the square image, in pixels.
    object_size_range: (min, max) side of an object's bounding box, in pixels;
      the target and each distractor draw their size from it.
    num_distractors: gray objects per image; placed so that they never overlap
      the target (a distractor that finds no free spot is dropped).
    num_train: examples in the 'train' split.
    num_validation: examples in the 'validation' split.
    seed: base seed; changing it gives a different but equally hard dataset.

  With the defaults, a 0.64M-parameter SparseFormer (16 tokens, 16 points)
  trained at batch 64 is at ~55% validation accuracy after 48k training
  images and ~98% after 80k. Objects of 12-20 px learn more slowly: at
  stride-4 feature resolution the small filled and hollow shapes blur.
  """

  canvas_size: int = 64
  object_size_range: tuple[float, float] = (16.0, 22.0)
  num_distractors: int = 4
  num_train: int = 20_000
  num_validation: int = 2_000
  seed: int = 0


class SyntheticObjects(tfds.core.GeneratorBasedBuilder):
  """Find the one colored object among gray distractors and name its shape."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  # Tells the input pipeline that download_and_prepare() only generates data
  # locally, so it may run it automatically on first use.
  GENERATED_LOCALLY = True
  BUILDER_CONFIGS = [
      SyntheticObjectsConfig(
          name='default',
          description='64x64 images, objects 16-22 px, 4 distractors, 20k/2k examples.',
      ),
      SyntheticObjectsConfig(
          name='smoke',
          description='Same images as default, only 512/128 examples for quick tests.',
          num_train=512,
          num_validation=128,
      ),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.canvas_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(names=shapes.SHAPE_NAMES),
            'bbox': tfds.features.BBoxFeature(),  # the target's box
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    return {
        'train': self._generate_examples('train', config.num_train),
        'validation': self._generate_examples('validation', config.num_validation),
    }

  def _generate_examples(self, split, num_examples):
    config = self.builder_config
    for index in range(num_examples):
      rng = np.random.default_rng((config.seed, _SPLIT_IDS[split], index))
      label = index % len(shapes.SHAPE_NAMES)  # exactly balanced classes
      image, bbox = render_image(config, rng, shapes.SHAPE_NAMES[label])
      yield index, {'image': image, 'label': label, 'bbox': bbox}


def render_image(config, rng, target_shape):
  """Draws one example; returns the uint8 image and the target's tfds BBox."""
  size = config.canvas_size
  canvas = shapes.textured_background(rng, size, size)
  target_size = rng.uniform(*config.object_size_range)
  target_center = rng.uniform(target_size / 2 + 1, size - target_size / 2 - 1, size=2)
  for _ in range(config.num_distractors):
    _draw_distractor(canvas, config, rng, target_center, target_size)
  shapes.draw_shape(canvas, target_shape, target_center, target_size, shapes.random_vivid_color(rng))
  return shapes.to_uint8(canvas), _bbox(target_center, target_size, size)


def _draw_distractor(canvas, config, rng, target_center, target_size):
  """Draws a gray object of random shape somewhere it does not touch the target."""
  size = rng.uniform(*config.object_size_range)
  shape = shapes.SHAPE_NAMES[rng.integers(len(shapes.SHAPE_NAMES))]
  color = shapes.random_gray(rng)
  min_distance = (size + target_size) / 2 + 1  # per axis, for the boxes not to touch
  for _ in range(_PLACEMENT_ATTEMPTS):
    center = rng.uniform(size / 2, config.canvas_size - size / 2, size=2)
    if np.any(np.abs(center - target_center) >= min_distance):
      shapes.draw_shape(canvas, shape, center, size, color)
      return


def _bbox(center, box_size, canvas_size):
  """The target's box as a tfds BBox with coordinates normalised to [0, 1]."""
  low = np.clip((center - box_size / 2) / canvas_size, 0.0, 1.0)
  high = np.clip((center + box_size / 2) / canvas_size, 0.0, 1.0)
  return tfds.features.BBox(ymin=low[0], xmin=low[1], ymax=high[0], xmax=high[1])
