"""Base of the TFDS datasets this project draws itself: nothing to download, seeded examples."""
import abc

import numpy as np
import tensorflow_datasets as tfds

SPLIT_IDS = {'train': 0, 'validation': 1}


class LocallyGeneratedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """'train' and 'validation' splits of `config.num_train` / `config.num_validation` examples.

  Example i of a split is drawn from its own generator, seeded by (config.seed, split, i): any
  example can be regenerated alone, whatever the generation order.
  """
  # Tells the input pipeline that download_and_prepare() only generates data
  # locally, so it may run it automatically on first use.
  GENERATED_LOCALLY = True

  @abc.abstractmethod
  def _example(self, rng: np.random.Generator, index: int) -> dict:
    """The features of example `index` of a split, drawn from `rng`."""

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
      rng = np.random.default_rng((config.seed, SPLIT_IDS[split], index))
      yield index, self._example(rng, index)
