"""Trains and evaluates SparseFormer: `python main.py --config=configs/X.py[:arg] --workdir=DIR`.

Config fields can be overridden as --config.field=value (e.g. --config.global_batch_size=256).
Running the same command again resumes from the workdir's latest checkpoint. On a Cloud TPU pod
(or SLURM/Open MPI cluster) run the same command on every host: the processes find each other
through jax.distributed.initialize(); elsewhere pass --coordinator_address/--num_processes/
--process_id.

A bad flag, config or workdir ends the run before anything compiles with one line naming it and
the fix (exit status 1), as does a run that cannot go on (a full disk, a diverged model).
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from sparseformer_jax.ops import xla_cpu

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'default.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Config file; `file.py:arg` passes arg to its get_config.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and config.json go here.',
                               required=True)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs outside a '
    'cluster that JAX detects by itself.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')


def _initialize_distributed() -> None:
  """jax.distributed.initialize() before anything touches devices, where there are processes.

  Explicit flags win; otherwise JAX detects Cloud TPU, SLURM, Open MPI ... and a plain machine
  with none of them runs as a single process.
  """
  if _COORDINATOR.value is not None:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:  # No cluster environment was detected: one process.
    logging.info('Single-process run (%s).', e)


def _innermost(error: BaseException) -> BaseException:
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def _one_line(error: BaseException) -> str:
  """An error as one line: a syntax error with its place, a KeyError without its quotes."""
  if isinstance(error, SyntaxError):
    return f'{error.filename}:{error.lineno}: {error.msg}'
  text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
  return ' '.join(text.split())


def _config_error(argv, error: BaseException) -> str:
  """What is wrong with --config or one of its --config.field overrides, and the fix."""
  # pylint: disable-next=g-import-not-at-top
  from sparseformer_jax.trainer import config_schema
  given = dict(a.split('=', 1) for a in argv[1:] if a.startswith('--config') and '=' in a)
  config_arg = given.get('--config', _DEFAULT_CONFIG)
  config_file = config_arg.split(':', 1)[0]
  if not os.path.isfile(config_file):
    return (f'--config {config_file}: no such file (a relative path starts at the current '
            f'directory, {os.getcwd()}).')
  cause = _innermost(error)
  if isinstance(cause, (KeyError, AttributeError)):  # An override of a field the config lacks.
    missing = _one_line(cause).strip('\'"')
    for flag in given:
      field = flag[len('--config.'):]
      if flag.startswith('--config.') and missing in field.split('.'):
        return config_schema.unknown_field_message(field)
  return f'--config {config_arg}: {_one_line(cause)}'


def _parse_flags(argv):
  """absl's flag parsing, every failure (the config file's included) told in one line."""
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value.keys()  # A config file that failed to load raises only when read.
  except flags.Error as e:  # A value of the wrong type, an unknown flag, a failing get_config.
    text = str(e) if 'Error whilst parsing config file' not in str(e) else _one_line(_innermost(e))
    sys.exit(f'main.py: {" ".join(text.split())}')
  except Exception as e:  # pylint: disable=broad-exception-caught
    sys.exit(f'main.py: {_config_error(argv, e)}')
  return remaining


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_cpu.tune_malloc_for_xla_cpu()   # before JAX starts its threads
  _initialize_distributed()
  # Imported only now: nothing may touch devices before jax.distributed.initialize().
  # pylint: disable=g-import-not-at-top
  from sparseformer_jax.trainer import checkpointing
  from sparseformer_jax.trainer import train
  from sparseformer_jax.trainer import config_schema
  from sparseformer_jax.trainer import workdir_lock
  checkpointing.quiet_orbax_logging()
  logging.info('JAX process %d of %d, %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (config_schema.ConfigError, checkpointing.CheckpointError,
          workdir_lock.WorkdirLockedError, FloatingPointError) as e:
    sys.exit(f'main.py: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
