"""Every bad argument or config gets one line from main.py naming the field and the fix, before
anything compiles, never a traceback. Cheaply: main.py's flag parsing of every case in one
process, the trainer's checks (whose errors main.py prints as its line) in this one."""
import json
import os
import socket
import subprocess

import pytest

from conftest import REPO, main_command, run_python, smoke_config
from sparseformer_jax.trainer import checkpointing
from sparseformer_jax.trainer import config_schema
from sparseformer_jax.trainer import train
from sparseformer_jax.trainer import workdir_lock

SMOKE = '--config=configs/default.py:smoke'
# The errors main.py turns into its one line (and exit status 1).
MAIN_REPORTS = (config_schema.ConfigError, checkpointing.CheckpointError,
                workdir_lock.WorkdirLockedError, FloatingPointError)

# Parses main.py's flags for each argv of argv[1] (JSON) in turn; prints {index: exit message}.
PARSE_DRIVER = """
import importlib.util, json, sys
from absl import flags
spec = importlib.util.spec_from_file_location('sparseformer_main', 'main.py')
main = importlib.util.module_from_spec(spec)
spec.loader.exec_module(main)
messages = {}
for i, argv in enumerate(json.loads(sys.argv[1])):
  sys.argv = ['main.py', *argv]  # config_flags reads the overrides there
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)  # the previous argv's --config.field overrides
  flags.FLAGS.unparse_flags()
  try:
    main._parse_flags(sys.argv)
    messages[i] = None
  except SystemExit as e:
    messages[i] = e.code
print(json.dumps(messages))
"""


def _one_line(message: str, expected: str) -> None:
  assert '\n' not in message and 'Traceback' not in message, message
  assert expected in message, message


FLAG_CASES = [
    (['--config=configs/no_such_config.py'], '--config configs/no_such_config.py: no such file'),
    (['--config={tmp}/syntax_error.py'], '{tmp}/syntax_error.py:1: invalid syntax'),
    (['--config=configs/default.py:smok'], "Unknown config argument 'smok': use 'smoke'"),
    ([SMOKE, '--config.optimizer.lr=0.1'], 'config.optimizer.lr is not a known field. Did you '
                                           'mean optimizer.base_lr?'),
    ([SMOKE, '--config.global_batch_size=3x'], "flag --config.global_batch_size=3x: invalid "
                                               "literal for int() with base 10: '3x'"),
    ([SMOKE, '--config.eval_only=maybe'], 'flag --config.eval_only=maybe'),
    ([SMOKE, '--no_such_flag=1'], "Unknown command line flag 'no_such_flag'"),
]


@pytest.fixture(scope='module')
def flag_errors(main_env, tmp_path_factory):
  """(tmp dir, {case index: what main.py exits with}): main.py's flag parsing of every case,
  in one process with no other flags defined."""
  tmp = tmp_path_factory.mktemp('flags')
  (tmp / 'syntax_error.py').write_text('def get_config(:\n')
  argvs = [[a.format(tmp=tmp) for a in argv] + [f'--workdir={tmp}'] for argv, _ in FLAG_CASES]
  result = run_python(main_env, PARSE_DRIVER, json.dumps(argvs))
  return tmp, {int(k): v for k, v in json.loads(result.stdout.splitlines()[-1]).items()}


@pytest.mark.parametrize('case', range(len(FLAG_CASES)),
                         ids=[' '.join(a[1:] or a) for a, _ in FLAG_CASES])
def test_a_bad_flag_or_config_file_gets_one_line(flag_errors, case):
  tmp, messages = flag_errors
  line = messages[case]
  assert line is not None and line.startswith('main.py: '), line
  _one_line(line, FLAG_CASES[case][1].format(tmp=tmp))


def _smoke(**fields):
  config = smoke_config()
  for dotted, value in fields.items():
    *parents, leaf = dotted.split('__')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


# (config fields, workdir under tmp, the line): every check that runs before anything compiles.
BAD_RUNS = [
    (dict(global_batch_size=0), 'run', 'config.global_batch_size=0 must be > 0'),
    (dict(optimizer__base_lr=-0.1), 'run', 'config.optimizer.base_lr=-0.1 must be > 0'),
    (dict(optimizer__base_lr=0.0), 'run', 'config.optimizer.base_lr=0.0 must be > 0'),
    (dict(num_train_steps=-1, num_epochs=0.0), 'run', 'The run has no length: set '
                                                      'config.num_epochs'),
    (dict(checkpoint_every_steps=-5), 'run', 'config.checkpoint_every_steps=-5 must be >= 0'),
    (dict(nan_skip_limit=0), 'run', 'config.nan_skip_limit=0 must be > 0'),
    (dict(nan_policy='ignore'), 'run', "config.nan_policy='ignore' is not one of"),
    (dict(input__image_size=5), 'run', "config.input.image_size=5 is smaller than the stem's "
                                       '7x7 convolution: use at least 7'),
    ({}, '', '--workdir is empty: pass the directory'),
    ({}, 'a_file', '--workdir {tmp}/a_file is a file: pass a directory'),
    (dict(init_from='{tmp}/missing'), 'run', "config.init_from='{tmp}/missing': {tmp}/missing "
                                             'is not there: init_from takes a workdir'),
    (dict(init_from='{tmp}/a_file'), 'run', 'a_file is not a directory: init_from takes'),
    (dict(init_from='{tmp}/empty'), 'run', 'No complete checkpoint under {tmp}/empty'),
    (dict(eval_only=True), 'run', 'config.eval_only needs weights: {tmp}/run has no '
                                  'checkpoint; set config.init_from'),
    (dict(dataset='no_such_dataset'), 'run', "config.dataset='no_such_dataset': TFDS has no "
                                             "dataset named 'no_such_dataset'"),
    (dict(data_dir='{tmp}/nowhere'), 'run', "config.data_dir='{tmp}/nowhere' is not a "
                                            'directory: pass your TFDS data directory'),
]


@pytest.mark.parametrize('fields, workdir, message', BAD_RUNS,
                         ids=[m.split(':')[0][:40] for _, _, m in BAD_RUNS])
def test_a_bad_config_or_workdir_gets_one_line_before_anything_compiles(
    tmp_path, no_compiles, fields, workdir, message):
  (tmp_path / 'a_file').write_text('not a directory')
  (tmp_path / 'empty').mkdir()
  config = _smoke(**{k: v.format(tmp=tmp_path) if isinstance(v, str) else v
                     for k, v in fields.items()})
  with pytest.raises(MAIN_REPORTS) as error:  # what main.py prints as its one line
    train.train_and_evaluate(config, str(tmp_path / workdir) if workdir else '')
  _one_line(str(error.value), message.format(tmp=tmp_path))
  assert no_compiles() == 0


def test_another_models_checkpoint_as_init_from_lists_the_differences(smoke_run, tmp_path,
                                                                      no_compiles):
  config = _smoke(init_from=str(smoke_run), model__overrides__num_tokens=16)
  with pytest.raises(MAIN_REPORTS) as error:
    train.train_and_evaluate(config, str(tmp_path))
  first, *differences = str(error.value).splitlines()
  assert first.startswith(f'The checkpoint {smoke_run}/checkpoints/12 does not match')
  assert '    params/initial_roi: checkpoint (9, 4) vs model (16, 4)' in differences
  assert 'set config.init_skip=head' in differences[-1]
  assert no_compiles() == 0


def test_main_prints_the_one_line_and_exits_1(main_env, tmp_path):
  """A second run on a workdir in use (here held by this process) is refused at start."""
  first = workdir_lock.WorkdirLock(str(tmp_path))
  try:
    result = subprocess.run(main_command(tmp_path), env=main_env, cwd=REPO, capture_output=True,
                            text=True, timeout=300, check=False)
  finally:
    first.release()
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.splitlines()[-1] == (
      f'main.py: The workdir {tmp_path} is in use by process {os.getpid()} on host '
      f'{socket.gethostname()} (lock {tmp_path}/run.lock): wait for that run to end or stop it, '
      'or pass another --workdir.')
  assert not (tmp_path / 'checkpoints').exists()  # refused before touching anything
