"""Prepares a TFDS dataset for training: a TFDS-defined one, or a folder of your own images.

  python scripts/prepare_data.py --dataset imagenet2012 --data_dir D --manual_dir M
  python scripts/prepare_data.py --folder ~/photos --dataset my_photos --data_dir D

For imagenet2012, M must hold the official ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar (ILSVRC2012_img_test.tar is optional; a missing
archive's split is skipped). Validation labels ship with TFDS. Datasets
without manual files are downloaded by TFDS; the locally generated datasets
of sparseformer_jax.data are generated. D may be a gs:// bucket.

--folder takes FOLDER/<class>/<image> (split by --val_fraction) or
FOLDER/train/<class>/<image> with an optional FOLDER/val/<class>/<image>; see
sparseformer_jax/data/image_folder.py. Then train with
--config.dataset=NAME --config.data_dir=D (e.g. configs/finetune.py).
"""

import argparse
import os
import pathlib
import sys

import tensorflow_datasets as tfds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
# pylint: disable=g-import-not-at-top
from sparseformer_jax.data import image_folder
from sparseformer_jax.data import input_pipeline

_SHOWN = 10  # skipped files listed in the summary (all of them are in the report file)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataset', required=True,
                      help="TFDS name, e.g. 'imagenet2012', or the new name of --folder's data.")
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data dir (local or gs://); default: the TFDS default.')
  parser.add_argument('--manual_dir', default=None,
                      help='Directory with manually downloaded archives (ImageNet tars).')
  folder = parser.add_argument_group('a folder of images (--folder)')
  folder.add_argument('--folder', default=None, help='Class folders of images.')
  folder.add_argument('--val_fraction', type=float, default=0.1,
                      help='Share of each class held out for validation when there is no '
                           'val/ folder.')
  folder.add_argument('--max_side', type=int, default=512,
                      help='Larger images are downscaled to this longer side (aspect kept).')
  folder.add_argument('--seed', type=int, default=0, help='Seeds the train/validation split.')
  folder.add_argument('--rebuild', action='store_true',
                      help='Prepare a changed folder again, as a new version of the dataset.')
  return parser.parse_args(argv)


def prepare(dataset: str, data_dir: str | None, manual_dir: str | None = None):
  """Runs download_and_prepare and returns the prepared builder."""
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise FileNotFoundError(f'--manual_dir {manual_dir!r} is not a directory.')
  builder = input_pipeline.get_builder(dataset, data_dir)
  tfds.display_progress_bar(True)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def report_folder(prepared: image_folder.Prepared, folder: str, data_dir: str) -> str:
  """The summary of a --folder run."""
  lines = [f'Removed the partial build {p} of an interrupted run.' for p in prepared.interrupted]
  for name in prepared.empty_classes:
    lines.append(f'Warning: the class folder {name!r} has no image files; it is not a class.')
  name = os.path.basename(os.path.dirname(prepared.directory))
  if prepared.unchanged:
    lines.append(f'{name} {prepared.version} in {prepared.directory} was already prepared from '
                 f'{folder}, which has not changed: nothing to do.')
  else:
    lines.append(f'Prepared {name} {prepared.version} in {prepared.directory}:')
  lines += [f'  {split}: {n} examples' for split, n in sorted(prepared.counts.items())]
  lines.append(f'  {len(prepared.classes)} classes: {", ".join(prepared.classes)}'
               if len(prepared.classes) <= 20 else f'  {len(prepared.classes)} classes')
  if prepared.skipped:
    report = os.path.join(prepared.directory, image_folder.REPORT_FILE)
    lines.append(f'  {len(prepared.skipped)} files skipped (all listed in {report}):')
    lines += [f'    {line}' for line in prepared.skipped[:_SHOWN]]
    if len(prepared.skipped) > _SHOWN:
      lines.append(f'    ... and {len(prepared.skipped) - _SHOWN} more')
  lines.append(f'Train on it with --config.dataset={name} --config.data_dir={data_dir}')
  return '\n'.join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.folder is None:
    builder = prepare(args.dataset, args.data_dir, args.manual_dir)
    print(f'Prepared {builder.name} {builder.version} in {builder.data_dir}:')
    for name, split in sorted(builder.info.splits.items()):
      print(f'  {name}: {split.num_examples} examples')
    return
  data_dir = os.path.expanduser(args.data_dir or tfds.core.constants.DATA_DIR)
  try:
    prepared = image_folder.prepare_folder(
        args.folder, args.dataset, data_dir, val_fraction=args.val_fraction,
        max_side=args.max_side, seed=args.seed, rebuild=args.rebuild,
        progress=sys.stderr.isatty())
  except image_folder.FolderError as e:
    sys.exit(f'prepare_data.py: {e}')
  print(report_folder(prepared, args.folder, data_dir))


if __name__ == '__main__':
  main()
