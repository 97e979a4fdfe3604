"""main.py end to end on the embedded default's smoke run: records, kill -9, signals, a failed
save, resume, and scripts/demo.sh."""
import hashlib
import json
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import tensorflow as tf

from conftest import (REPO, assert_same_run, by_step, main_command, read_metrics, run_main,
                      run_python, xla_flags)

TRAIN_NAMES = ('train/loss', 'train/lr', 'train/grad_norm', 'train/img_per_sec')
VAL_NAMES = ('val/top1', 'val/top5', 'val/num_examples', 'ema_val/top1', 'ema_val/top5')


def test_smoke_run_records_config_metrics_events_and_checkpoints(smoke_run):
  config = json.loads((smoke_run / 'config.json').read_text())
  assert config['dataset'] == 'synthetic_objects/smoke'
  assert config['model']['overrides']['num_tokens'] == 9
  records = read_metrics(smoke_run)
  for name in TRAIN_NAMES:
    assert sorted(by_step(records, name)) == [2, 4, 6, 8, 10, 12], name
  for name in VAL_NAMES:
    assert sorted(by_step(records, name)) == [12], name
  assert by_step(records, 'val/num_examples') == {12: 128}  # the whole smoke eval split
  assert by_step(records, 'steps_per_sec')  # clu's ReportProgress went through the writer
  events = list(smoke_run.glob('events.out.tfevents.*'))
  assert events
  images = [v.tag for e in tf.compat.v1.train.summary_iterator(str(events[0]))
            for v in e.summary.value if v.tag == 'rois']
  assert images == ['rois']   # the eval's picture of the tokens' RoIs, in TensorBoard
  assert list(smoke_run.glob('plugins/profile/*/*.xplane.pb'))  # the profiler window
  checkpoints = smoke_run / 'checkpoints'
  assert sorted(int(p.name) for p in checkpoints.iterdir()) == [4, 8, 12]
  assert all((p / 'commit_success.txt').exists() for p in checkpoints.iterdir())


def test_kill9_midway_then_same_command_resumes_exactly(smoke_run, main_env, tmp_path):
  workdir = tmp_path / 'run'
  checkpoints = workdir / 'checkpoints'
  with open(tmp_path / 'first.log', 'w') as log:
    proc = subprocess.Popen(main_command(workdir), env=dict(main_env, XLA_FLAGS=xla_flags(1)),
                            stdout=log, stderr=log)
    deadline = time.time() + 300
    while not (checkpoints / '4' / 'commit_success.txt').exists():
      assert proc.poll() is None and time.time() < deadline, 'no checkpoint at step 4'
      time.sleep(0.02)
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (checkpoints / '12').exists(), 'the run ended before it was killed'
  # What interrupted saves leave behind, wherever the kill landed: a tmp dir (local disks) and
  # a step dir without its commit file (object stores). Neither may be loaded.
  (checkpoints / '9.orbax-checkpoint-tmp-1234' / 'state').mkdir(parents=True)
  shutil.copytree(checkpoints / '4', checkpoints / '10')
  (checkpoints / '10' / 'commit_success.txt').unlink()

  result = run_main(main_env, workdir)  # The same command again.
  deleted = re.findall(r'Deleting \S+/checkpoints/(\S+), a save that was interrupted',
                       result.stderr)
  # The kill itself may also have interrupted a save (of step 8): that one is deleted as well.
  assert '9.orbax-checkpoint-tmp-1234' in deleted, deleted
  assert not (checkpoints / '9.orbax-checkpoint-tmp-1234').exists()
  assert f'{checkpoints}/10: it has no commit_success.txt' in result.stderr
  assert (checkpoints / '10.incomplete' / 'state').is_dir()  # moved aside, never deleted
  assert re.search(r'Resuming from \S+/checkpoints/(4|8)\.', result.stderr)
  assert_same_run(workdir, smoke_run)


# Runs the trainer with a SIGTERM arriving while its final save commits (Checkpoints.close).
FINAL_SAVE_SIGTERM_DRIVER = """
import os, signal, sys
from conftest import smoke_config
from sparseformer_jax.trainer import checkpointing, train
real_close = checkpointing.Checkpoints.close

def close_under_sigterm(self):
  os.kill(os.getpid(), signal.SIGTERM)
  real_close(self)

checkpointing.Checkpoints.close = close_under_sigterm
train.train_and_evaluate(smoke_config(), sys.argv[1])
"""


def _stop_with(signals, workdir, env, first_step: int) -> tuple:
  """Sends `signals` when training starts, each as soon as the previous one was handled;
  (the step it stopped at, its stderr)."""
  proc = subprocess.Popen(main_command(workdir), env=dict(env, XLA_FLAGS=xla_flags(1)),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if f'Training steps {first_step}..12 ' in line:  # The handlers are installed by now.
      break
  for signum in signals:  # (One sent before the last was handled would merge with it.)
    proc.send_signal(signum)
    for line in proc.stderr:
      seen.append(line)
      if ' received' in line:
        break
  stderr = ''.join(seen) + proc.communicate(timeout=300)[1]
  assert proc.returncode == 0, stderr[-3000:]
  step = int(re.search(r'Stopped for preemption at step (\d+)', stderr).group(1))
  assert (workdir / 'checkpoints' / str(step) / 'commit_success.txt').exists()
  return step, stderr


def test_sigterm_twice_and_ctrl_c_save_the_current_step_then_the_same_command_resumes(
    smoke_run, main_env, tmp_path):
  workdir = tmp_path / 'run'
  step, stderr = _stop_with([signal.SIGTERM, signal.SIGTERM], workdir, main_env, 1)
  assert 'SIGTERM received: saving a checkpoint after the current step' in stderr
  assert 'SIGTERM received again: already stopping, the checkpoint is being saved' in stderr
  assert step < 12

  later, stderr = _stop_with([signal.SIGINT], workdir, main_env, step + 1)
  assert 'SIGINT (Ctrl-C) received: saving a checkpoint after the current step' in stderr
  assert later > step

  # A SIGTERM during the final save: the handler stays until it commits, the run ends normally.
  finished = run_python(main_env, FINAL_SAVE_SIGTERM_DRIVER, str(workdir))
  assert 'SIGTERM received' in finished.stderr
  assert (workdir / 'checkpoints' / '12' / 'commit_success.txt').exists()
  assert_same_run(workdir, smoke_run)


def _strict_json(line: str) -> dict:
  def refuse(token):
    raise ValueError(f'{token} is not JSON')
  return json.loads(line, parse_constant=refuse)


def test_a_failed_save_stops_the_run_at_once_then_the_same_command_resumes(smoke_run, main_env,
                                                                            tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run, workdir)
  for step in (8, 12):  # As if the run had stopped after its checkpoint of step 4.
    shutil.rmtree(workdir / 'checkpoints' / str(step))

  def small_files():  # A real failed write: EFBIG beyond 400 kB, as a full disk gives ENOSPC.
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (400_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  failed = subprocess.run(main_command(workdir), env=dict(main_env, XLA_FLAGS=xla_flags(1)),
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                          preexec_fn=small_files)
  assert failed.returncode == 1, failed.stderr[-3000:]
  line = failed.stderr.splitlines()[-1]
  assert line.startswith(f'main.py: Saving the checkpoint of step 8 into {workdir}/checkpoints '
                         'failed ('), line
  assert 'File too large' in line and 'the complete checkpoints (4) are intact' in line
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['4']  # no partial save
  records = [_strict_json(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  # Reported at the first step after the background write failed: on a loaded machine the
  # smoke run's last few (millisecond) steps may come first, so only step 8's save is fixed.
  assert 8 in by_step(records, 'train/loss') and max(r['step'] for r in records) <= 12

  run_main(main_env, workdir)
  assert_same_run(workdir, smoke_run)


def _wait_for(predicate, proc, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, 'the run ended before its kill'
    assert time.time() < deadline, 'the moment to kill never came'
    time.sleep(0.005)


def _train_and_val_steps(workdir):
  """(steps with train records, steps with val records) in metrics.jsonl (torn lines skipped)."""
  path = workdir / 'metrics.jsonl'
  train_steps, val_steps = set(), set()
  for line in (path.read_text().splitlines() if path.exists() else []):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if 'train/loss' in record:
      train_steps.add(record['step'])
    if 'val/top1' in record:
      val_steps.add(record['step'])
  return train_steps, val_steps


def test_kill9_ten_times_at_random_moments_then_the_run_ends_as_an_uninterrupted_one(
    smoke_run, main_env, tmp_path):
  workdir, checkpoints = tmp_path / 'run', tmp_path / 'run' / 'checkpoints'
  extra = ('--config.checkpoint_every_steps=2', '--config.eval_every_steps=4')  # more to hit
  saving = lambda: any('.orbax-checkpoint-tmp' in p.name for p in checkpoints.iterdir())

  def evaluating():  # The train record of an eval step is written, its val record not yet.
    train_steps, val_steps = _train_and_val_steps(workdir)
    last = max(train_steps, default=0)
    return last % 4 == 0 and last > 0 and last not in val_steps

  rng = random.Random(26)
  moments = ['start', 'loop', 'save', 'eval'] * 2 + ['start', 'loop']
  took_over = 0
  for i, moment in enumerate(moments):
    log_path = tmp_path / f'run_{i}.log'
    with open(log_path, 'w') as log:
      proc = subprocess.Popen(main_command(workdir, *extra),
                              env=dict(main_env, XLA_FLAGS=xla_flags(1)), stdout=log, stderr=log)
    training = lambda: 'Training steps' in log_path.read_text()  # pylint: disable=cell-var-from-loop
    if moment == 'start':  # importing, restoring, compiling: before training, at a random time
      deadline = time.time() + rng.uniform(0.5, 5.0)
      _wait_for(lambda: training() or time.time() > deadline, proc)  # pylint: disable=cell-var-from-loop
    else:
      _wait_for(training, proc)
      if moment == 'loop':
        time.sleep(rng.uniform(0.0, 0.5))
      else:
        _wait_for(saving if moment == 'save' else evaluating, proc)
    proc.kill()
    proc.wait()
    log = log_path.read_text()
    assert proc.returncode == -signal.SIGKILL, f'run {i} ended before its kill:\n{log[-3000:]}'
    if moment == 'save':
      assert saving(), 'the save had ended before the kill landed'
    took_over += 'Taking over the lock' in log  # a killed run's lock, with a warning

  run_main(main_env, workdir, *extra)
  assert took_over
  assert_same_run(workdir, smoke_run)


def _demo_checkout(tmp_path):
  """A checkout of this code (symlinks) whose .venv is this interpreter's, marked as installed:
  setup_env.sh then installs nothing."""
  checkout = tmp_path / 'checkout'
  checkout.mkdir()
  for name in ('main.py', 'configs', 'scripts', 'sparseformer_jax', 'requirements.txt',
               'pyproject.toml'):
    (checkout / name).symlink_to(REPO / name)
  bin_dir = checkout / '.venv' / 'bin'
  bin_dir.mkdir(parents=True)
  (bin_dir / 'python').symlink_to(sys.executable)
  (bin_dir / 'activate').write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
  requirements = b''.join((REPO / f).read_bytes() for f in ('requirements.txt', 'pyproject.toml'))
  (checkout / '.venv' / f'.installed-{hashlib.sha256(requirements).hexdigest()[:16]}').touch()
  return checkout


def test_demo_sh_without_arguments_trains_into_its_relative_default_workdir(main_env, tmp_path):
  checkout = _demo_checkout(tmp_path)
  env = dict(main_env, XLA_FLAGS=xla_flags(1), SPARSEFORMER_DEMO_CONFIG='configs/default.py:smoke')
  result = subprocess.run(['bash', 'scripts/demo.sh'], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Installing' not in result.stdout
  workdir = checkout / 'workdirs' / 'default'  # relative to the checkout: Orbax needs absolute
  assert (workdir / 'checkpoints' / '12' / 'commit_success.txt').exists()
  assert (workdir / 'rois.png').stat().st_size > 0
  assert 'Done: metrics in workdirs/default/metrics.jsonl' in result.stdout
