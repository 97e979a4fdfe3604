"""Checkpoints: only complete ones count, another model's is refused, PyTorch weights load."""
import functools
import importlib.util
import json
import resource
import shutil
import subprocess
import time

import flax

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (REPO, by_step, main_command, read_metrics, restore_numpy, run_main,
                      smoke_config)
from sparseformer_jax import load_torch_checkpoint
from sparseformer_jax.trainer import checkpointing
from sparseformer_jax.trainer import optim
from sparseformer_jax.trainer import sharding
from sparseformer_jax.trainer import train

FIXTURE = REPO / 'tests' / 'fixtures' / 'sf_v1_tiny_library_format.pth'
# The fixture's model (tests/fixtures/sf_v1_tiny_config.json) as create_model overrides.
FIXTURE_MODEL = dict(conv_dim=32, num_tokens=16, num_points=36, focusing_width=64,
                     cortex_width=128, cortex_depth=3, num_classes=10)
# The bootstrapped fixture: a tiny CLIP-flavoured model with an 8-wide projection head.
BTSP_FIXTURE = REPO / 'tests' / 'fixtures' / 'sf_btsp_tiny_library_format.pth'
BTSP_NAME = 'sparseformer_btsp_openai_clip_base'
BTSP_MODEL = dict(conv_dim=32, num_tokens=15, num_points=16, focusing_width=64, cortex_width=128,
                  cortex_depth=3, num_classes=8, generator_hidden=32)


def _state(value: float):
  return {'step': jnp.array(int(value), jnp.int32),
          'params': {'w': jnp.full((4, 3), value), 'b': jnp.full((3,), -value)}}


def test_only_complete_checkpoints_count_the_newest_kept_and_partial_ones_set_aside(tmp_path):
  checkpoints = checkpointing.Checkpoints(tmp_path, keep=2)
  for step in (1, 2, 3):
    checkpoints.save(step, _state(step))
  checkpoints.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['2', '3']
  # Left by saves cut short: a tmp dir (ours: deleted), and a step dir without its commit file
  # (object stores, or a damaged copy: moved aside, never deleted).
  (tmp_path / '4.orbax-checkpoint-tmp-1700000000').mkdir()
  shutil.copytree(tmp_path / '3', tmp_path / '5')
  (tmp_path / '5' / 'commit_success.txt').unlink()

  checkpoints = checkpointing.Checkpoints(tmp_path, keep=2)
  assert checkpoints.latest_step() == 3
  assert sorted(p.name for p in tmp_path.iterdir()) == ['2', '3', '5.incomplete']
  assert (tmp_path / '5.incomplete' / 'state').is_dir()
  restored = checkpoints.restore(3, jax.eval_shape(lambda: _state(0)))
  checkpoints.close()
  np.testing.assert_array_equal(restored['params']['w'], np.full((4, 3), 3.0))


def _random_state(step: int):
  """A state whose params do not compress: a damaged data file cannot go unnoticed."""
  return {'step': jnp.array(step, jnp.int32),
          'params': {'w': jax.random.normal(jax.random.key(step), (200, 300))}}


def _damage(step_dir, how: str) -> None:
  """Truncates, overwrites with garbage or deletes the largest data file of a checkpoint."""
  victim = max((p for p in step_dir.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  size = victim.stat().st_size
  if how == 'truncated':
    with open(victim, 'r+b') as f:
      f.truncate(size // 2)
  elif how == 'garbage':
    victim.write_bytes(np.random.default_rng(0).bytes(size))
  else:
    victim.unlink()


@pytest.mark.parametrize('how', ['truncated', 'garbage', 'deleted'])
def test_a_damaged_checkpoint_is_moved_aside_and_the_newest_that_restores_resumed(
    tmp_path, caplog, how):
  checkpoints = checkpointing.Checkpoints(tmp_path, keep=3)
  for step in (1, 2, 3):
    checkpoints.save(step, _random_state(step))
  checkpoints.close()
  _damage(tmp_path / '3', how)
  files = sorted(p.relative_to(tmp_path / '3') for p in (tmp_path / '3').rglob('*'))

  abstract = jax.eval_shape(lambda: _random_state(0))
  checkpoints = checkpointing.Checkpoints(tmp_path, keep=3)
  step, state = checkpoints.restore_latest(abstract)
  assert checkpoints.latest_step() == 2
  checkpoints.close()
  assert step == 2
  np.testing.assert_array_equal(state['params']['w'], _random_state(2)['params']['w'])
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2', '3.corrupt']
  assert sorted(p.relative_to(tmp_path / '3.corrupt')
                for p in (tmp_path / '3.corrupt').rglob('*')) == files  # kept, all of it
  warning = [r.getMessage() for r in caplog.records if 'does not restore' in r.getMessage()]
  assert len(warning) == 1 and f'{tmp_path}/3 does not restore' in warning[0]
  assert 'params.w' in warning[0] and 'resumed from step 2' in warning[0]

  # When no checkpoint restores, the run stops naming each one, and nothing is moved.
  for step in (1, 2):
    _damage(tmp_path / str(step), how)
  checkpoints = checkpointing.Checkpoints(tmp_path, keep=3)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'No checkpoint in \S+ restores: step 2: .*; step 1: .*move them aside'):
    checkpoints.restore_latest(abstract)
  checkpoints.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2', '3.corrupt']


def test_a_failed_save_is_reported_at_once_without_its_partial_files(tmp_path):
  """A real failed write: files beyond RLIMIT_FSIZE get EFBIG, as a full disk gets ENOSPC."""
  checkpoints = checkpointing.Checkpoints(tmp_path, keep=3)
  checkpoints.save(1, _random_state(1), wait=True)
  limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, limit[1]))  # the data file is ~240 kB
  try:
    checkpoints.save(2, _random_state(2))
    deadline = time.time() + 60
    with pytest.raises(checkpointing.CheckpointError) as error:
      while time.time() < deadline:  # What the train loop does after every step.
        checkpoints.check()
        time.sleep(0.05)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
  checkpoints.close()  # The failure was reported: closing does not raise it again.
  message = str(error.value)
  assert f'Saving the checkpoint of step 2 into {tmp_path} failed (' in message
  assert 'File too large' in message and 'the complete checkpoints (1) are intact' in message
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1']  # its partial files are gone
  checkpoints = checkpointing.Checkpoints(tmp_path, keep=3)
  step, state = checkpoints.restore_latest(jax.eval_shape(lambda: _random_state(0)))
  checkpoints.close()
  assert step == 1
  np.testing.assert_array_equal(state['params']['w'], _random_state(1)['params']['w'])


def test_restoring_into_another_structure_lists_every_difference(tmp_path):
  checkpoints = checkpointing.Checkpoints(tmp_path, keep=1)
  checkpoints.save(1, _state(1), wait=True)
  other = {'step': jnp.zeros((), jnp.int32),
           'params': {'w': jnp.zeros((4, 5)), 'extra': jnp.zeros((2,))}}
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    checkpoints.restore(1, jax.eval_shape(lambda: other))
  checkpoints.close()
  message = str(error.value)
  assert 'missing in the checkpoint (1):\n    params/extra' in message
  assert 'unexpected in the checkpoint (1):\n    params/b' in message
  assert 'shape differs (1):\n    params/w: checkpoint (4, 3) vs model (4, 5)' in message


@functools.lru_cache(maxsize=None)
def _converter():
  """scripts/convert_checkpoint.py as a module, loaded once (it defines absl flags)."""
  spec = importlib.util.spec_from_file_location('convert_checkpoint',
                                                REPO / 'scripts' / 'convert_checkpoint.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _convert(out, torch_file=FIXTURE, name='sparseformer_v1_tiny', model=None):
  """scripts/convert_checkpoint.py's convert(): the model fields the config must set."""
  return _converter().convert(str(torch_file), name, str(out), model or FIXTURE_MODEL)


def test_converted_pytorch_checkpoint_loads_exactly_and_evaluates(main_env, tmp_path):
  assert _convert(tmp_path / 'imagenet', FIXTURE.parent / 'sf_v1_tiny_imagenet_format.pth') == {
      'flavor': 'imagenet', 'grad_clamp': True}   # the library's numerics are the default
  fields = _convert(tmp_path / 'converted')
  assert fields == {}
  recorded = json.loads((tmp_path / 'converted' / 'model.json').read_text())  # load_pretrained
  assert recorded == {'name': 'sparseformer_v1_tiny', 'overrides': FIXTURE_MODEL}
  expected = load_torch_checkpoint(str(FIXTURE), 'sparseformer_v1_tiny', **FIXTURE_MODEL)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      expected['params'])
  loaded = checkpointing.load_entries(str(tmp_path / 'converted'),
                                      {'params': abstract, 'ema_params': abstract})
  assert set(loaded) == {'params'}  # A converted checkpoint has no EMA.
  for a, b in zip(jax.tree.leaves(loaded['params']), jax.tree.leaves(expected['params'])):
    np.testing.assert_array_equal(a, b)

  # No flavor flags: the run takes the converted weights' numerics from their model.json.
  overrides = [f'--config.model.overrides.{k}={v}' for k, v in FIXTURE_MODEL.items()
               if k != 'num_classes']
  run_main(main_env, tmp_path / 'eval', '--config.eval_only=True',
           f'--config.init_from={tmp_path / "converted"}', *overrides)
  records = read_metrics(tmp_path / 'eval')
  assert by_step(records, 'val/num_examples') == {0: 128}
  assert by_step(records, 'val/top1') == by_step(records, 'ema_val/top1')  # EMA = params


def test_a_relative_convert_out_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # --out converted/sf_t, as the README has it
  def full_disk(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  with monkeypatch.context() as patch:
    patch.setattr(checkpointing.Checkpoints, 'save', full_disk)
    with pytest.raises(OSError, match='No space left'):
      _convert('converted/sf_t')
  assert list((tmp_path / 'converted').iterdir()) == []  # no partial directory to trip over
  _convert('converted/sf_t')  # the same command again
  assert (tmp_path / 'converted' / 'sf_t' / '0' / 'commit_success.txt').exists()
  assert [p.name for p in (tmp_path / 'converted').iterdir()] == ['sf_t']
  with pytest.raises(ValueError, match='--out converted/sf_t is not empty'):
    _convert('converted/sf_t')


def test_a_checkpoint_of_another_model_is_refused_before_compiling(smoke_run, tmp_path,
                                                                   no_compiles):
  shutil.copytree(smoke_run, tmp_path / 'run')
  recorded = (tmp_path / 'run' / 'config.json').read_text()
  config = smoke_config()
  config.model.overrides.num_tokens = 16
  config.model.overrides.cortex_depth = 3
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(error.value)
  assert 'missing in the checkpoint' in message and 'params/cortex/unit_2/' in message
  assert 'params/initial_roi: checkpoint (9, 4) vs model (16, 4)' in message
  assert no_compiles() == 0
  # The record still describes the checkpoints (scripts/visualize.py --checkpoint reads it).
  assert (tmp_path / 'run' / 'config.json').read_text() == recorded


def test_a_finished_run_started_again_changes_nothing(smoke_run, tmp_path, no_compiles):
  shutil.copytree(smoke_run, tmp_path / 'run')
  before = (tmp_path / 'run' / 'metrics.jsonl').read_text()
  results = train.train_and_evaluate(smoke_config(), str(tmp_path / 'run'))
  assert (tmp_path / 'run' / 'metrics.jsonl').read_text() == before  # no second eval record
  final = [r for r in read_metrics(smoke_run) if 'val/top1' in r][-1]
  assert results == {k: v for k, v in final.items() if k != 'step'}
  assert no_compiles() == 0


def test_image_weights_inflate_into_the_video_model(smoke_run):
  config = smoke_config()
  config.model.overrides.update(video=True, replicates=2)
  config.input.num_frames = 8
  config.init_from = str(smoke_run)  # an image run of the same model sizes
  config.init_inflate_replicates = 2
  model = train._build_model(config, num_classes=10)  # pylint: disable=protected-access
  mesh = sharding.create_mesh(config.mesh)
  tx = optim.create_optimizer(config.optimizer, lambda step: 0.0)
  abstract = jax.eval_shape(train.make_init_fn(model, tx, config))
  shardings = sharding.state_shardings(abstract, mesh)
  weights = train.load_init_weights(config, sharding.with_shardings(abstract, shardings),
                                    shardings, mesh)
  image = restore_numpy(smoke_run, 12)['params']
  video_roi = np.asarray(weights['params']['initial_roi'])  # (2 replicas x 9 tokens, x y t x y t)
  assert video_roi.shape == (18, 6)
  for replica in range(2):
    np.testing.assert_array_equal(video_roi[replica * 9:(replica + 1) * 9][:, [0, 1, 3, 4]],
                                  image['initial_roi'])
  np.testing.assert_array_equal(weights['params']['head']['kernel'], image['head']['kernel'])


def test_a_bootstrapped_clip_model_fine_tunes_through_main_with_a_new_head(main_env, tmp_path):
  converted = tmp_path / 'converted'
  assert _convert(converted, BTSP_FIXTURE, BTSP_NAME, BTSP_MODEL) == {}
  args = [f'--config.model.name={BTSP_NAME}', f'--config.init_from={converted}',
          # The smoke config's own model overrides, back to the variant's values.
          '--config.model.overrides.focusing_repeats=4', '--config.model.overrides.num_heads=0',
          *(f'--config.model.overrides.{k}={v}' for k, v in BTSP_MODEL.items()
            if k != 'num_classes'),
          '--config.num_train_steps=2', '--config.log_every_steps=1']
  # Its 8-wide CLIP projection does not fit the dataset's 10 classes: refused, the fix named.
  refused = subprocess.run(main_command(tmp_path / 'refused', *args), env=main_env, cwd=REPO,
                           capture_output=True, text=True, timeout=300, check=False)
  assert refused.returncode != 0
  assert 'params/head/kernel: checkpoint (128, 8) vs model (128, 10)' in refused.stderr
  assert 'config.init_skip=head' in refused.stderr

  run_main(main_env, tmp_path / 'run', *args, '--config.init_skip=head')
  records = read_metrics(tmp_path / 'run')
  assert sorted(by_step(records, 'train/loss')) == [1, 2]
  assert by_step(records, 'val/num_examples') == {2: 128}
  trained = restore_numpy(tmp_path / 'run', 2)['params']
  start = load_torch_checkpoint(str(BTSP_FIXTURE), BTSP_NAME, **BTSP_MODEL)['params']
  assert trained['head']['kernel'].shape == (128, 10)  # a new head, no bias (CLIP projection)
  del start['head'], trained['head']
  # Two warm-up steps move a param by at most ~1e-3: every other weight came from PyTorch.
  flat_start, flat_trained = (flax.traverse_util.flatten_dict(t, sep='/')
                              for t in (start, trained))
  assert flat_start.keys() == flat_trained.keys()
  for name, value in flat_start.items():
    np.testing.assert_allclose(flat_trained[name], value, atol=5e-3, err_msg=name)
