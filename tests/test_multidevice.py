"""8 fake devices and 2 processes give the single-device results; checkpoints move between them."""
import shutil
import socket
import subprocess

import jax

from conftest import (assert_same_run, by_step, checkpoint_metadata, main_command, read_metrics,
                      run_main, run_python, xla_flags)


def test_8_devices_with_fsdp_and_sub_batches_continue_a_1_device_run_with_the_same_losses(
    smoke_run, main_env, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run, workdir)
  for step in ('8', '12'):  # Resume the 1-device run from its step-4 checkpoint.
    shutil.rmtree(workdir / 'checkpoints' / step)
  # 4-way data parallel x 2-way fsdp: the largest params and their Adam moments are split.
  # Every device's 4 train (8 eval) images run as 2 sub-batches: the results do not change.
  result = run_main(main_env, workdir, '--config.mesh.fsdp=2', '--config.sub_batches=2',
                    devices=8)
  assert "Mesh('data': 4, 'fsdp': 2" in result.stderr
  assert 'Training steps 5..12' in result.stderr
  specs = [str(m.sharding.partition_spec) for m in jax.tree.leaves(
      checkpoint_metadata(workdir, 12)['params'])]
  assert any('fsdp' in spec for spec in specs), specs
  # Steps 5-12 ran on 8 devices; their final checkpoint is restored here on 1.
  assert_same_run(workdir, smoke_run)


def test_8_devices_reject_a_global_batch_they_cannot_split_before_compiling(main_env, tmp_path):
  workdir = tmp_path / 'never_created'
  result = subprocess.run(
      main_command(workdir, '--config.global_batch_size=36'),
      env=dict(main_env, XLA_FLAGS=xla_flags(8)),
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert ('config.global_batch_size=36 is not divisible by the 8 devices: set '
          '--config.global_batch_size to a multiple of 8, e.g. 40.') in result.stderr
  assert not workdir.exists()


# One process that reads, as its batches, what processes 0 and 1 of 2 read together.
BOTH_PROCESSES_DRIVER = """
import sys
import numpy as np
from conftest import smoke_config
from sparseformer_jax.trainer import train
from sparseformer_jax.data import input_pipeline
real_iterator = input_pipeline.create_train_iterator

def both_processes(config, *, local_batch_size, process_index, process_count, start_step=0):
  halves = [real_iterator(config, local_batch_size=local_batch_size // 2, process_index=i,
                          process_count=2, start_step=start_step) for i in range(2)]
  for parts in zip(*halves):
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

input_pipeline.create_train_iterator = both_processes
train.train_and_evaluate(smoke_config(), sys.argv[1])
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_and_their_checkpoint_restores_in_one(main_env,
                                                                              tmp_path):
  workdir, reference = tmp_path / 'two_processes', tmp_path / 'reference'
  env = dict(main_env, XLA_FLAGS=xla_flags(2),
             JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
  port = _free_port()
  logs = [open(tmp_path / f'process_{i}.log', 'w') for i in range(2)]
  processes = [subprocess.Popen(
      main_command(workdir, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                   f'--process_id={i}'), env=env, stdout=logs[i], stderr=logs[i])
               for i in range(2)]
  try:
    run_python(main_env, BOTH_PROCESSES_DRIVER, str(reference))
    for i, process in enumerate(processes):
      assert process.wait(timeout=600) == 0, (tmp_path / f'process_{i}.log').read_text()[-5000:]
  finally:
    for process, log in zip(processes, logs):
      process.kill()
      log.close()
  assert "Mesh('data': 4" in (tmp_path / 'process_0.log').read_text()
  assert_same_run(workdir, reference)  # Restores the 2-process checkpoint in this process.

  # The trainer itself, on 1 device, resumes the 2-process checkpoint (eval only).
  shutil.copytree(workdir, tmp_path / 'eval')
  run_main(main_env, tmp_path / 'eval', '--config.eval_only=True')
  evals = [r for r in read_metrics(tmp_path / 'eval') if 'val/top1' in r]
  assert evals[-1] == {**evals[-2], 'step': 12}
  assert by_step(read_metrics(tmp_path / 'eval'), 'val/num_examples')[12] == 128
