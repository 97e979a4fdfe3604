"""Trains and evaluates SparseFormer: `python main.py --config=configs/X.py[:arg] --workdir=DIR`.

Config fields can be overridden as --config.field=value (e.g. --config.global_batch_size=256).
Running the same command again resumes from the workdir's latest checkpoint. On a Cloud TPU pod
(or SLURM/Open MPI cluster) run the same command on every host: the processes find each other
through jax.distributed.initialize(); elsewhere pass --coordinator_address/--num_processes/
--process_id.
"""
import os

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_cpu.tune_malloc_for_xla_cpu()   # before JAX starts its threads
  _initialize_distributed()
  # Imported only now: nothing may touch devices before jax.distributed.initialize().
  # pylint: disable=g-import-not-at-top
  from sparseformer_jax.trainer import checkpointing
  from sparseformer_jax.trainer import train
  checkpointing.quiet_orbax_logging()
  logging.info('JAX process %d of %d, %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
