"""main.py end to end on the embedded default's smoke run: records, kill -9, SIGTERM, resume."""
import json
import re
import shutil
import signal
import subprocess
import time

import tensorflow as tf

from conftest import assert_same_run, by_step, main_command, read_metrics, run_main, xla_flags

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
  ignored = re.findall(r'partly written checkpoint \S+/checkpoints/(\S+) ', result.stderr)
  # The kill itself may also have interrupted a save (of step 8): that one is ignored as well.
  assert {'9.orbax-checkpoint-tmp-1234', '10'} <= set(ignored), ignored
  assert not (checkpoints / '9.orbax-checkpoint-tmp-1234').exists()
  assert re.search(r'Resuming from \S+/checkpoints/(4|8)\.', result.stderr)
  assert_same_run(workdir, smoke_run)


def test_sigterm_saves_the_current_step_then_the_same_command_resumes(smoke_run, main_env,
                                                                       tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(main_command(workdir), env=dict(main_env, XLA_FLAGS=xla_flags(1)),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  for line in proc.stderr:
    if 'Training steps 1..12 ' in line:  # The SIGTERM handler is installed by now.
      proc.send_signal(signal.SIGTERM)
      break
  stderr = proc.communicate(timeout=300)[1]
  assert proc.returncode == 0, stderr[-3000:]
  step = int(re.search(r'Stopped for preemption at step (\d+)', stderr).group(1))
  assert step < 12
  assert (workdir / 'checkpoints' / str(step) / 'commit_success.txt').exists()

  result = run_main(main_env, workdir)
  assert f'Training steps {step + 1}..12' in result.stderr
  assert_same_run(workdir, smoke_run)
