"""Prepares a TFDS dataset for training, showing TFDS's progress bars.

  python scripts/prepare_data.py --dataset imagenet2012 --data_dir D --manual_dir M

For imagenet2012, M must hold the official ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar (ILSVRC2012_img_test.tar is optional; a missing
archive's split is skipped). Validation labels ship with TFDS. Datasets
without manual files are downloaded by TFDS; the locally generated datasets
of sparseformer_jax.data are generated. D may be a gs:// bucket.
"""

import argparse
import os
import pathlib
import sys

import tensorflow_datasets as tfds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
from sparseformer_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataset', required=True, help="TFDS name, e.g. 'imagenet2012'.")
  parser.add_argument('--data_dir', required=True, help='TFDS data dir (local or gs://).')
  parser.add_argument('--manual_dir', default=None,
                      help='Directory with manually downloaded archives (ImageNet tars).')
  return parser.parse_args(argv)


def prepare(dataset: str, data_dir: str, manual_dir: str | None = None):
  """Runs download_and_prepare and returns the prepared builder."""
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise FileNotFoundError(f'--manual_dir {manual_dir!r} is not a directory.')
  builder = input_pipeline.get_builder(dataset, data_dir)
  tfds.display_progress_bar(True)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv=None) -> None:
  args = parse_args(argv)
  builder = prepare(args.dataset, args.data_dir, args.manual_dir)
  print(f'Prepared {builder.name} {builder.version} in {builder.data_dir}:')
  for name, split in sorted(builder.info.splits.items()):
    print(f'  {name}: {split.num_examples} examples')


if __name__ == '__main__':
  main()
