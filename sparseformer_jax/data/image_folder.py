"""A folder of images -> a TFDS dataset that the trainer reads like ImageNet.

Layouts: FOLDER/train/<class>/... with an optional FOLDER/val/<class>/... (or validation/), or a
flat FOLDER/<class>/...; without a val folder, each class is split into train/validation by a
seeded fraction (at least one image of a class in each split where it has two or more). The
classes are the class-folder names, sorted; folders without images are left out with a warning.

Each file is decoded once (image_files.load_rgb: any mode -> upright RGB, downscaled to
max_side) and stored re-encoded (JPEG files as JPEG of JPEG_QUALITY, others as PNG) with features
`image`, `label` (ClassLabel) and `file_name` (the path in FOLDER). Files that cannot be read are
skipped and listed in DATA_DIR/NAME/VERSION/skipped_files.txt. The dataset is written into a
temporary directory and moved to DATA_DIR/NAME/VERSION only when complete, with the folder's
fingerprint (source.json): `tfds.builder(NAME, data_dir=DATA_DIR)` never sees a partial dataset,
a re-run on the same folder does nothing, and a changed folder is noticed.
"""
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import socket
import uuid

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tqdm import tqdm

from sparseformer_jax.data import image_files
from sparseformer_jax.data import input_pipeline

VAL_FOLDERS = ('val', 'validation')
SOURCE_FILE = 'source.json'           # the folder and options a version was prepared from
REPORT_FILE = 'skipped_files.txt'     # one line per file that was skipped: path and reason
FIRST_VERSION = tfds.core.Version('1.0.0')
JPEG_QUALITY = 95                     # re-encoding of JPEG files (others are stored as PNG)
_INCOMPLETE = '.incomplete-'          # DATA_DIR/.NAME.incomplete-HOST-PID-ID: a build under way
_CHUNK = 256                          # files decoded in parallel at a time (bounds memory)


class FolderError(ValueError):
  """The folder, the dataset name or the data dir cannot be used; the message names the fix."""


@dataclasses.dataclass
class Scan:
  """What a folder holds: the classes, and each split's (path in the folder, label) pairs."""
  layout: str
  classes: list
  splits: dict
  skipped: list          # 'path: reason' of files that are not in a class folder or no images
  empty_classes: list    # class folders without an image file (left out of the classes)

  def fingerprint(self, folder: str) -> str:
    """Changes when an image file is added, removed, or rewritten (size or time)."""
    digest = hashlib.sha256()
    for path in sorted(p for examples in self.splits.values() for p, _ in examples):
      stat = os.stat(os.path.join(folder, path))
      digest.update(f'{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
    return digest.hexdigest()


@dataclasses.dataclass
class Prepared:
  """The outcome of prepare_folder: where the dataset is and what went into it."""
  directory: str
  version: str
  unchanged: bool        # True: the folder was already prepared, nothing was written
  counts: dict           # split -> examples
  classes: list
  skipped: list          # 'path: reason', also in REPORT_FILE
  empty_classes: list
  interrupted: list      # partial builds of killed runs, deleted before this one


def _files_below(directory: str, root: str):
  """Every file below `directory` not hidden (no leading '.'), sorted, as paths from `root`."""
  for parent, dirs, files in os.walk(directory, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in sorted(files):
      if not name.startswith('.'):
        yield os.path.relpath(os.path.join(parent, name), root)


def _class_folders(directory: str, root: str):
  """({class: [image paths]}, skipped, empty classes) of the class folders in `directory`."""
  classes, skipped, empty = {}, [], []
  for entry in sorted(os.scandir(directory), key=lambda e: e.name):
    if entry.name.startswith('.'):
      continue
    path = os.path.relpath(entry.path, root)
    if not entry.is_dir():
      skipped.append(f'{path}: not in a class folder')
      continue
    images = []
    for file in _files_below(entry.path, root):
      if image_files.is_image_name(os.path.basename(file)):
        images.append(file)
      else:
        skipped.append(f'{file}: not an image file name '
                       f'({", ".join(image_files.IMAGE_EXTENSIONS)})')
    if images:
      classes[entry.name] = images
    else:
      empty.append(entry.name)
  return classes, skipped, empty


def split_by_fraction(files: dict, classes: list, val_fraction: float, seed: int):
  """(train, validation) lists of (path, label): per class, round(n * val_fraction) files, at
  least 1 and at most n - 1 (none when n = 1), chosen by a hash of (seed, path)."""
  train, validation = [], []
  for label, name in enumerate(classes):
    ordered = sorted(files[name],
                     key=lambda p: hashlib.sha256(f'{seed}\0{p}'.encode()).digest())
    n = len(ordered)
    n_val = 0 if n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    validation += [(p, label) for p in sorted(ordered[:n_val])]
    train += [(p, label) for p in sorted(ordered[n_val:])]
  return train, validation


def scan_folder(folder: str, *, val_fraction: float, seed: int) -> Scan:
  """The classes and splits of `folder` (either layout); decodes nothing."""
  if not os.path.isdir(folder):
    raise FolderError(f'--folder {folder} is not a directory.')
  if not 0.0 < val_fraction < 1.0:
    raise FolderError(f'--val_fraction {val_fraction} must be in (0, 1).')
  train_dir = os.path.join(folder, 'train')
  top = train_dir if os.path.isdir(train_dir) else folder
  files, skipped, empty = _class_folders(top, folder)
  classes = sorted(files)
  if not classes:
    raise FolderError(
        f'{folder} has no class folders with images: expected {folder}/<class>/<image> or '
        f'{folder}/train/<class>/<image> (image files end in '
        f'{", ".join(image_files.IMAGE_EXTENSIONS)}).')
  val_dir = next((os.path.join(folder, v) for v in VAL_FOLDERS
                  if top == train_dir and os.path.isdir(os.path.join(folder, v))), None)
  if val_dir is None:
    train, validation = split_by_fraction(files, classes, val_fraction, seed)
    layout = (f'{"train/<class>" if top == train_dir else "<class>"} folders, '
              f'{val_fraction:g} of each class for validation (seed {seed})')
  else:
    val_files, val_skipped, _ = _class_folders(val_dir, folder)
    unknown = sorted(set(val_files) - set(classes))
    if unknown:
      raise FolderError(f'{val_dir} has class folders that train/ has no images of: '
                        f'{", ".join(unknown)}; add their training images or remove them.')
    train = [(p, label) for label, c in enumerate(classes) for p in files[c]]
    validation = [(p, classes.index(c)) for c in sorted(val_files) for p in val_files[c]]
    skipped += val_skipped
    layout = f'train/ and {os.path.basename(val_dir)}/ folders'
  if not validation:
    raise FolderError(f'{folder} gives no validation images: every class has a single image. '
                      'Add images, or a val/<class>/ folder beside train/.')
  return Scan(layout, classes, {'train': train, 'validation': validation}, skipped, empty)


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS narrates a build as a download and warns about the empty build directory; hush it."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    logging.set_verbosity(verbosity)


def _encode(pixels: np.ndarray, path: str) -> bytes:
  buffer = io.BytesIO()
  if path.lower().endswith(('.jpg', '.jpeg')):
    Image.fromarray(pixels).save(buffer, format='JPEG', quality=JPEG_QUALITY)
  else:
    Image.fromarray(pixels).save(buffer, format='PNG')
  return buffer.getvalue()


def _read(folder: str, path: str, max_side: int):
  """(encoded RGB image, None) or (None, 'path: reason')."""
  try:
    return _encode(image_files.load_rgb(os.path.join(folder, path), max_side), path), None
  except image_files.UnreadableImageError as e:
    return None, f'{path}: {str(e).split(": ", 1)[-1]}'


def _examples(folder, examples, max_side, skipped, progress):
  """TFDS (key, example) pairs of the readable images; unreadable ones go to `skipped`."""
  workers = min(32, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for start in range(0, len(examples), _CHUNK):
      chunk = examples[start:start + _CHUNK]
      for (path, label), (image, problem) in zip(
          chunk, pool.map(lambda e: _read(folder, e[0], max_side), chunk)):
        progress.update()
        if problem:
          skipped.append(problem)
        else:
          yield path, {'image': image, 'label': label, 'file_name': path}


def _complete_versions(dataset_dir: str) -> list:
  """The versions under DATA_DIR/NAME that were written completely, oldest first."""
  if not os.path.isdir(dataset_dir):
    return []
  versions = [tfds.core.Version(v) for v in os.listdir(dataset_dir)
              if tfds.core.Version.is_valid(v)
              and os.path.exists(os.path.join(dataset_dir, v, 'dataset_info.json'))]
  return sorted(versions)


def check_name(name: str, data_dir: str) -> None:
  """A new TFDS name (not one TFDS or this package defines) and a local data dir."""
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise FolderError(f'--dataset {name!r}: use lower-case letters, digits and _ (a TFDS '
                      'name, e.g. my_photos).')
  if '://' in data_dir:
    raise FolderError(f'--data_dir {data_dir}: a folder is prepared on a local disk; prepare '
                      'it locally, then copy DATA_DIR/NAME to the bucket (gsutil -m cp -r).')
  input_pipeline.import_local_datasets()
  if name in tfds.list_builders(with_community_datasets=False):
    raise FolderError(f'--dataset {name!r} is a dataset TFDS already defines (which '
                      '--config.dataset would read instead); choose another name.')


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _remove_interrupted_builds(data_dir: str, name: str) -> list:
  """Deletes builds of `name` that killed runs left behind (never read: they were not moved into
  place) and returns their paths; refuses while a build of another live process is under way."""
  removed = []
  for entry in sorted(os.listdir(data_dir)):
    match = re.fullmatch(re.escape(f'.{name}{_INCOMPLETE}') + r'(.*)-(\d+)-[0-9a-f]+', entry)
    if not match:
      continue
    path = os.path.join(data_dir, entry)
    host, pid = match.group(1), int(match.group(2))
    if host == socket.gethostname() and pid != os.getpid() and _alive(pid):
      raise FolderError(f'Process {pid} is preparing {name} in {data_dir} right now ({path}); '
                        'wait for it to finish.')
    shutil.rmtree(path, ignore_errors=True)
    removed.append(path)
  return removed


def _source(folder: str, scan: Scan, options: dict) -> dict:
  return {'folder': os.path.abspath(folder), 'options': options,
          'fingerprint': scan.fingerprint(folder),
          'images': sum(len(e) for e in scan.splits.values())}


def _unchanged(existing: str, source: dict, name: str, version) -> bool:
  """True when `existing` (a version dir) was prepared from the same folder and options;
  raises FolderError when it was not (the fix: --rebuild)."""
  try:
    with open(os.path.join(existing, SOURCE_FILE)) as f:
      before = json.load(f)
  except (OSError, ValueError):
    raise FolderError(f'{existing} holds a dataset {name!r} that was not prepared from a '
                      'folder; choose another --dataset.') from None
  if before == source:
    return True
  if before['folder'] != source['folder']:
    what = f'was prepared from {before["folder"]}'
  elif before['options'] != source['options']:
    what = f'was prepared with {before["options"]} (now {source["options"]})'
  else:
    what = (f'was prepared from {before["images"]} image files of {source["folder"]}, which '
            f'changed since (now {source["images"]})')
  raise FolderError(f'{name} {version} in {os.path.dirname(existing)} {what}. Pass --rebuild '
                    f'to prepare it again as a new version ({version} stays readable as '
                    f'--config.dataset={name}:{version}).')


def prepare_folder(folder: str, name: str, data_dir: str, *, val_fraction: float, max_side: int,
                   seed: int, rebuild: bool = False, progress: bool = True) -> Prepared:
  """Writes `folder` as the TFDS dataset `name` into `data_dir` (or finds it prepared)."""
  check_name(name, data_dir)
  if max_side < 1:
    raise FolderError(f'--max_side {max_side} must be >= 1.')
  scan = scan_folder(folder, val_fraction=val_fraction, seed=seed)
  options = {'val_fraction': val_fraction, 'max_side': max_side, 'seed': seed}
  source = _source(folder, scan, options)
  os.makedirs(data_dir, exist_ok=True)
  removed = _remove_interrupted_builds(data_dir, name)
  dataset_dir = os.path.join(data_dir, name)
  versions = _complete_versions(dataset_dir)
  version = FIRST_VERSION
  if versions:
    existing = os.path.join(dataset_dir, str(versions[-1]))
    if not rebuild and _unchanged(existing, source, name, versions[-1]):
      return dataclasses.replace(_read_back(existing), interrupted=removed)
    version = tfds.core.Version(f'{versions[-1].major}.{versions[-1].minor + 1}.0')
  build_id = f'{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  build_dir = os.path.join(data_dir, f'.{name}{_INCOMPLETE}{build_id}')
  skipped = list(scan.skipped)
  total = sum(len(e) for e in scan.splits.values())
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(),
      'label': tfds.features.ClassLabel(names=scan.classes),
      'file_name': tfds.features.Text(),
  })
  tfds.disable_progress_bar()  # ours counts files; TFDS's would count shards
  try:
    with tqdm(total=total, unit='img', desc=f'{name} {version}', disable=not progress,
              mininterval=0.5) as bar, _quiet_tfds():
      builder = tfds.dataset_builders.store_as_tfds_dataset(
          name=name, version=str(version), features=features, data_dir=build_dir,
          split_datasets={split: _examples(folder, examples, max_side, skipped, bar)
                          for split, examples in scan.splits.items()},
          description=f'The images of {os.path.abspath(folder)} ({scan.layout}), prepared by '
                      'scripts/prepare_data.py --folder.')
  except AssertionError as e:  # TFDS: 'Failed to finalize writing of split "X": No examples'
    shutil.rmtree(build_dir, ignore_errors=True)
    raise FolderError(f'{folder}: not one image of a split could be read ({e}); '
                      f'{len(skipped)} files skipped, e.g. {"; ".join(skipped[:3])}.') from None
  built = os.fspath(builder.data_path)
  counts = {s: builder.info.splits[s].num_examples for s in scan.splits}
  with open(os.path.join(built, SOURCE_FILE), 'w') as f:
    json.dump(source, f, indent=1)
  with open(os.path.join(built, REPORT_FILE), 'w') as f:
    f.write(''.join(line + '\n' for line in skipped))
  os.makedirs(dataset_dir, exist_ok=True)
  final = os.path.join(dataset_dir, str(version))
  os.replace(built, final)  # the moment the dataset becomes readable, complete
  shutil.rmtree(build_dir, ignore_errors=True)
  return Prepared(final, str(version), False, counts, scan.classes, skipped, scan.empty_classes,
                  removed)


def _read_back(directory: str) -> Prepared:
  """The Prepared of a complete version directory (unchanged), from its TFDS info and report."""
  builder = tfds.builder_from_directory(directory)
  with open(os.path.join(directory, REPORT_FILE)) as f:
    skipped = f.read().splitlines()
  return Prepared(directory, str(builder.version), True,
                  {s: i.num_examples for s, i in builder.info.splits.items()},
                  list(builder.info.features['label'].names), skipped, [], [])
