"""A folder of images -> scripts/prepare_data.py --folder -> a TFDS dataset the trainer reads."""
import contextlib
import io
import os
import pathlib
import runpy
import signal
import socket
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sparseformer_jax.trainer import config_schema
from sparseformer_jax.data import image_folder
from sparseformer_jax.data import input_pipeline
import image_folder_helpers as helpers

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'prepare_data.py'


def run_script(*args):
  """scripts/prepare_data.py ARGS as __main__ in this process -> (exit code, stdout, stderr)."""
  argv, out, err = sys.argv, io.StringIO(), io.StringIO()
  sys.argv = [str(SCRIPT), *map(str, args)]
  code = 0
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      runpy.run_path(str(SCRIPT), run_name='__main__')
  except SystemExit as e:
    code, err = 1, io.StringIO(str(e.code))
  finally:
    sys.argv = argv
  return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('folder')
  readable = helpers.write_folder(root / 'pics')
  code, out, err = run_script('--folder', root / 'pics', '--dataset', 'my_pics',
                              '--data_dir', root / 'tfds', '--val_fraction', 0.25)
  assert code == 0, err
  return {'root': root, 'folder': root / 'pics', 'data_dir': root / 'tfds',
          'readable': readable, 'stdout': out}


def _data_config(dataset, data_dir):
  """The schema's config (every field the pipeline reads) pointed at a prepared dataset."""
  config = config_schema.base_config()
  config.dataset, config.data_dir = dataset, os.fspath(data_dir)
  return config


def test_every_readable_image_is_in_the_dataset_and_every_other_file_is_reported(prepared):
  data_dir = prepared['data_dir']
  train = helpers.file_names(data_dir, 'my_pics', 'train')
  validation = helpers.file_names(data_dir, 'my_pics', 'validation')
  assert sorted(train + validation) == prepared['readable']   # each once, none lost
  assert not set(train) & set(validation)
  report = (data_dir / 'my_pics' / '1.0.0' / image_folder.REPORT_FILE).read_text()
  for path in helpers.UNREADABLE:
    assert path in report and path in prepared['stdout']
  assert '.hidden' not in report
  assert 'empty_class' in prepared['stdout'] and '4 files skipped' in prepared['stdout']
  config = _data_config('my_pics', data_dir)
  assert input_pipeline.get_dataset_info(config) == {
      'num_classes': 3, 'num_train_examples': len(train),
      'num_eval_examples': len(validation)}


def test_images_are_rgb_downscaled_and_labelled_by_their_folder(prepared):
  builder = tfds.builder('my_pics', data_dir=os.fspath(prepared['data_dir']))
  assert builder.info.features['label'].names == ['blue', 'green', 'red']
  for split in ('train', 'validation'):
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
      name = example['file_name'].decode()
      image = example['image']
      assert image.ndim == 3 and image.shape[-1] == 3, name
      assert max(image.shape[:2]) <= 512, name
      assert builder.info.features['label'].names[example['label']] == name.split('/')[0]
      if name == 'red/huge.png':
        assert image.shape == (512, 512, 3)
      if name == 'blue/tiny.png':
        assert image.shape == (1, 1, 3)
      if name == 'green/rgba.png':
        np.testing.assert_array_equal(image[0, 0], helpers.COLOURS['green'])


def test_rerun_is_a_no_op_and_a_changed_folder_is_refused_until_rebuild(prepared, tmp_path):
  args = ('--folder', prepared['folder'], '--dataset', 'my_pics', '--data_dir',
          prepared['data_dir'], '--val_fraction', 0.25)
  info = prepared['data_dir'] / 'my_pics' / '1.0.0' / 'dataset_info.json'
  before = info.stat().st_mtime_ns
  code, out, _ = run_script(*args)
  assert code == 0 and 'nothing to do' in out
  assert info.stat().st_mtime_ns == before
  code, _, err = run_script(*args[:-1], 0.5)
  assert code == 1 and '--rebuild' in err and 'val_fraction' in err
  (prepared['folder'] / 'red' / 'new.png').write_bytes((prepared['folder'] / 'red' / '0.png')
                                                       .read_bytes())
  try:
    code, _, err = run_script(*args)
    assert code == 1 and '--rebuild' in err and 'changed' in err and '\n' not in err.strip()
    code, out, _ = run_script(*args, '--rebuild')
    assert code == 0 and 'Prepared my_pics 1.1.0' in out
    assert 'red/new.png' in helpers.file_names(prepared['data_dir'], 'my_pics', 'train') + \
        helpers.file_names(prepared['data_dir'], 'my_pics', 'validation')
    assert info.exists()  # the old version stays readable
  finally:
    (prepared['folder'] / 'red' / 'new.png').unlink()


def test_flat_split_is_seeded_and_covers_every_image_once():
  files = {'a': [f'a/{i}.png' for i in range(20)], 'b': ['b/0.png', 'b/1.png'],
           'c': ['c/0.png']}
  classes = sorted(files)
  train, validation = image_folder.split_by_fraction(files, classes, 0.25, seed=3)
  everything = sorted(p for paths in files.values() for p in paths)
  assert sorted(p for p, _ in train + validation) == everything
  assert all(classes[label] == path.split('/')[0] for path, label in train + validation)
  val_of = lambda pairs, c: [p for p, label in pairs if classes[label] == c]
  assert len(val_of(validation, 'a')) == 5
  assert len(val_of(validation, 'b')) == 1 and len(val_of(train, 'b')) == 1
  assert val_of(validation, 'c') == []       # a single image trains
  assert image_folder.split_by_fraction(files, classes, 0.25, seed=3) == (train, validation)
  assert image_folder.split_by_fraction(files, classes, 0.25, seed=4)[1] != validation


def test_train_and_val_folders_are_the_splits(tmp_path):
  helpers.write_folder(tmp_path / 'pics' / 'train', per_class=3, special=False)
  helpers.write_folder(tmp_path / 'pics' / 'val', per_class=2, seed=1, special=False)
  scan = image_folder.scan_folder(str(tmp_path / 'pics'), val_fraction=0.1, seed=0)
  assert scan.classes == ['blue', 'green', 'red']
  assert len(scan.splits['train']) == 9 and len(scan.splits['validation']) == 6
  assert all(p.startswith('val/') for p, _ in scan.splits['validation'])
  (tmp_path / 'pics' / 'val' / 'grey').mkdir()
  (tmp_path / 'pics' / 'val' / 'grey' / 'x.png').write_bytes(b'')
  with pytest.raises(image_folder.FolderError, match='grey'):
    image_folder.scan_folder(str(tmp_path / 'pics'), val_fraction=0.1, seed=0)


@pytest.mark.parametrize('args, needle', [
    (('--dataset', 'mnist'), 'TFDS already defines'),
    (('--dataset', 'My Pics'), 'lower-case'),
    (('--dataset', 'ok', '--val_fraction', '1.5'), 'val_fraction'),
    (('--dataset', 'ok', '--data_dir', 'gs://bucket/tfds'), 'local disk'),
])
def test_bad_arguments_get_one_line(tmp_path, args, needle):
  helpers.write_folder(tmp_path / 'pics', per_class=2, special=False)
  args = ('--folder', tmp_path / 'pics', '--data_dir', tmp_path / 'tfds') + args
  code, _, err = run_script(*args)
  assert code == 1 and needle in err and '\n' not in err.strip() and 'Traceback' not in err
  code, _, err = run_script('--folder', tmp_path / 'nowhere', '--dataset', 'x',
                            '--data_dir', tmp_path / 'tfds')
  assert code == 1 and 'not a directory' in err


def test_a_killed_prepare_is_never_read_and_rebuilt_next_time(tmp_path):
  readable = helpers.write_folder(tmp_path / 'pics')
  data_dir = tmp_path / 'tfds'
  command = [sys.executable, str(SCRIPT), '--folder', str(tmp_path / 'pics'), '--dataset',
             'killed', '--data_dir', str(data_dir)]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=str(SCRIPT.parents[1]))
  process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 120
  while not any(data_dir.glob('.killed.incomplete-*/*')) and process.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert process.returncode == -signal.SIGKILL, 'the build finished before it could be killed'
  config = _data_config('killed', data_dir)
  with pytest.raises(input_pipeline.DatasetNotFoundError, match='--folder DIR --dataset killed'):
    input_pipeline.get_dataset_info(config)
  code, out, err = run_script(*command[2:])
  assert code == 0, err
  assert 'Removed the partial build' in out
  assert not list(data_dir.glob('.killed.incomplete-*'))
  live = data_dir / f'.killed.incomplete-{socket.gethostname()}-{os.getppid()}-0a'
  live.mkdir()  # a build that a running process (this one's parent) would own
  code, _, err = run_script(*command[2:], '--rebuild')
  assert code == 1 and f'Process {os.getppid()}' in err and live.exists()
  assert sorted(helpers.file_names(data_dir, 'killed', 'train')
                + helpers.file_names(data_dir, 'killed', 'validation')) == readable


def _png_header_only(width: int, height: int) -> bytes:
  """A PNG that claims width x height pixels and holds none (PIL refuses it on open)."""
  def chunk(kind, data):
    return (len(data).to_bytes(4, 'big') + kind + data
            + zlib.crc32(kind + data).to_bytes(4, 'big'))
  header = width.to_bytes(4, 'big') + height.to_bytes(4, 'big') + bytes([8, 2, 0, 0, 0])
  return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IEND', b'')


def test_a_decompression_bomb_is_skipped_not_decoded(tmp_path):
  helpers.write_folder(tmp_path / 'pics', per_class=2, special=False)
  (tmp_path / 'pics' / 'red' / 'bomb.png').write_bytes(_png_header_only(40_000, 40_000))
  prepared = image_folder.prepare_folder(str(tmp_path / 'pics'), 'bomb', str(tmp_path / 'tfds'),
                                         val_fraction=0.1, max_side=512, seed=0, progress=False)
  assert [line.split(':')[0] for line in prepared.skipped] == ['red/bomb.png']
  assert sum(prepared.counts.values()) == 6


def test_a_split_without_one_readable_image_is_refused_and_nothing_is_left(tmp_path):
  helpers.write_folder(tmp_path / 'pics' / 'train', per_class=2, special=False)
  for colour in helpers.COLOURS:
    (tmp_path / 'pics' / 'val' / colour).mkdir(parents=True)
    (tmp_path / 'pics' / 'val' / colour / 'broken.png').write_bytes(b'not a png')
  with pytest.raises(image_folder.FolderError, match=r'split "validation".*val/\w+/broken\.png'):
    image_folder.prepare_folder(str(tmp_path / 'pics'), 'broken', str(tmp_path / 'tfds'),
                                val_fraction=0.1, max_side=512, seed=0, progress=False)
  assert os.listdir(tmp_path / 'tfds') == []
