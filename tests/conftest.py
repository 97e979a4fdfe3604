"""Helpers of the trainer tests: the smoke config, main.py in a subprocess, one reference run.

Subprocesses share a JAX compilation cache, so runs of one program compile it once.
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))  # `configs` imports like main.py sees it.

# The reference smoke run: log every 2 steps and checkpoint every 4 of its 12 steps.
SMOKE_ARGS = ('--config=configs/default.py:smoke', '--config.log_every_steps=2',
              '--config.checkpoint_every_steps=4')


def smoke_config(name: str = 'default'):
  """configs/<name>.py:smoke with the reference run's logging and checkpoint cadence."""
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.log_every_steps = 2
  config.checkpoint_every_steps = 4
  return config


def pipeline_config(dataset: str, data_dir, seed: int, image_key: str = 'image', **fields):
  """The schema's config for an input-pipeline test: `dataset` in `data_dir`, 32 px, no repeated
  augmentation (so batches show which examples were read), then `fields` of config.input."""
  from sparseformer_jax.trainer import config_schema  # pylint: disable=g-import-not-at-top
  config = config_schema.base_config()
  config.update(dict(seed=seed, dataset=dataset, data_dir=os.fspath(data_dir),
                     image_key=image_key))
  config.input.update({'image_size': 32, 'repeated_aug': 1, **fields})
  return config


def read_metrics(workdir) -> list:
  return [json.loads(line) for line in (Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


def by_step(records, name: str) -> dict:
  """{step: value} of one metric name."""
  return {r['step']: r[name] for r in records if name in r}


def _manager(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.CheckpointManager(Path(workdir) / 'checkpoints',
                               item_handlers={'state': ocp.PyTreeCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(create=False))


def checkpoint_metadata(workdir, step: int):
  """The saved state's tree of Orbax array metadata (shapes, dtypes, shardings)."""
  manager = _manager(workdir)
  tree = manager.item_metadata(step)['state'].tree
  manager.close()
  return tree


def restore_numpy(workdir, step: int) -> dict:
  """A checkpoint's whole state as numpy, restored onto this process's single device."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = _manager(workdir)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(step)['state'].tree)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))
  manager.close()
  return jax.device_get(restored['state'])


@pytest.fixture(scope='session')
def main_env(tmp_path_factory):
  """Environment of main.py subprocesses: quiet TF, one shared compilation cache."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  base = tmp_path_factory.getbasetemp()
  # pytest-xdist workers share their parent directory, hence one cache for all of them.
  cache = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'jax_cache'
  env.update(TF_CPP_MIN_LOG_LEVEL='3', PYTHONUNBUFFERED='1',
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')
  return env


def xla_flags(devices: int) -> str:
  """`devices` fake CPU devices; LLVM -O0 halves compile times, which dominate these runs."""
  return (f'--xla_force_host_platform_device_count={devices} '
          '--xla_backend_optimization_level=0')


def main_command(workdir, *extra) -> list:
  return [sys.executable, str(REPO / 'main.py'), *SMOKE_ARGS, f'--workdir={workdir}', *extra]


def run_main(env, workdir, *extra, devices: int = 1, timeout: int = 300):
  """Runs main.py on `devices` fake CPU devices to completion; returns the CompletedProcess."""
  env = dict(env, XLA_FLAGS=xla_flags(devices))
  result = subprocess.run(main_command(workdir, *extra), env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  return result


def run_python(env, code: str, *args, devices: int = 1, check: bool = True, timeout: int = 300):
  """Runs `python -c code args` from the repo with tests/ importable (for trainer drivers)."""
  env = dict(env, XLA_FLAGS=xla_flags(devices),
             PYTHONPATH=os.pathsep.join([str(REPO / 'tests'), str(REPO)]))
  result = subprocess.run([sys.executable, '-c', code, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)
  if check:
    assert result.returncode == 0, result.stderr[-5000:]
  return result


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory, main_env):
  """The uninterrupted reference: the embedded default's smoke run through main.py.

  It also profiles steps 3-4 (the profiler does not change what is computed).
  """
  workdir = tmp_path_factory.mktemp('smoke_reference')
  run_main(main_env, workdir, '--config.profile.first_step=3', '--config.profile.num_steps=2')
  return workdir


def assert_same_run(workdir, reference, *, rtol: float = 1e-5):
  """Same logged train/val scalars at every step (one record each) and same final params."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  got, want = read_metrics(workdir), read_metrics(reference)
  for name in ('train/loss', 'train/grad_norm', 'train/lr', 'val/top1', 'val/top5',
               'ema_val/top1', 'ema_val/top5', 'val/num_examples'):
    got_steps, want_steps = by_step(got, name), by_step(want, name)
    assert sum(name in r for r in got) == len(got_steps), f'{name} logged twice for a step'
    common = sorted(set(got_steps) & set(want_steps))
    assert common and common[-1] == 12, (name, got_steps, want_steps)
    np.testing.assert_allclose([got_steps[s] for s in common], [want_steps[s] for s in common],
                               rtol=rtol, atol=1e-6, err_msg=name)
  final, final_ref = restore_numpy(workdir, 12), restore_numpy(reference, 12)
  for key in ('params', 'ema_params'):
    for a, b in zip(jax_leaves(final[key]), jax_leaves(final_ref[key])):
      np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6, err_msg=key)
  assert int(final['step']) == 12


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


@pytest.fixture
def no_compiles():
  """A function returning how many XLA compilations ran since the test started."""
  import jax  # pylint: disable=g-import-not-at-top
  events = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield lambda: len(events)
  jax.monitoring.unregister_event_duration_listener(listener)
