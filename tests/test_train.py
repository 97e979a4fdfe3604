"""The trainer: its pieces in-process on a micro model, its loop through main.py subprocesses."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import by_step, read_metrics, restore_numpy, run_main, run_python, smoke_config
from sparseformer_jax import create_model
from sparseformer_jax.trainer import metrics as metrics_lib
from sparseformer_jax.trainer import optim
from sparseformer_jax.trainer import sharding
from sparseformer_jax.trainer import train
from sparseformer_jax.ops.sub_batches import apply_in_sub_batches

# create_model overrides of a model that compiles fast and still has every part.
MICRO_MODEL = dict(conv_dim=8, num_tokens=4, num_points=4, focusing_width=16, focusing_repeats=1,
                   cortex_width=32, cortex_depth=1, num_heads=2)


@pytest.fixture(scope='module')
def micro():
  """A micro model, its optimizer, its initial state and a 16-image batch."""
  config = smoke_config()
  config.model.overrides = MICRO_MODEL
  config.model.drop_path_rate = 0.0  # deterministic: accumulation can be compared exactly
  config.input.image_size = 32
  config.global_batch_size = 16
  model = create_model(config.model.name, num_classes=10, drop_path_rate=0.0, **MICRO_MODEL)
  schedule = optim.learning_rate_schedule(config.optimizer, global_batch_size=16,
                                          total_steps=12, warmup_steps=4)
  tx = optim.create_optimizer(config.optimizer, schedule)
  state = jax.jit(train.make_init_fn(model, tx, config))()
  images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
  labels = jax.nn.one_hot(jnp.arange(16) % 10, 10) * 0.9 + 0.01
  return dict(config=config, model=model, schedule=schedule, tx=tx, state=state,
              batch={'image': images, 'label': labels}, mesh=sharding.create_mesh(config.mesh))


def test_weight_decay_mask_spares_vectors_and_initial_roi(micro):
  mask = optim.weight_decay_mask(micro['state']['params'])
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  shapes = {jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_leaves_with_path(micro['state']['params'])}
  roi = [k for k in flat if k.endswith("['initial_roi']")]
  assert roi and not any(flat[k] for k in roi) and all(len(shapes[k]) == 2 for k in roi)
  for key, decays in flat.items():
    if key not in roi:
      assert decays == (len(shapes[key]) > 1), key


def _step_fn(micro, config):
  return jax.jit(train.make_train_step(micro['model'], micro['tx'], micro['schedule'], config,
                                       micro['mesh']))


@pytest.fixture(scope='module')
def first_step(micro):
  """The compiled train step and its result on the micro batch."""
  step_fn = _step_fn(micro, micro['config'])
  return step_fn, step_fn(micro['state'], micro['batch'])


def test_one_train_step_updates_and_a_nonfinite_step_changes_only_counters(micro, first_step):
  step_fn, (state1, m1) = first_step
  state0 = micro['state']
  assert int(state1['step']) == 1 and bool(m1['finite'])
  assert 1.5 < float(m1['train/loss']) < 3.5 and float(m1['train/grad_norm']) > 0
  np.testing.assert_allclose(m1['train/lr'], micro['schedule'](0), rtol=1e-6)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state1['params'],
                                       state0['params']))
  assert sum(moved) > 0.75 * len(moved)  # The rest sit behind zero-initialized layers.
  decay = micro['config'].optimizer.ema_decay  # ema = decay * init + (1 - decay) * new
  for ema, p0, p1 in zip(*map(jax.tree.leaves, (state1['ema_params'], state0['params'],
                                                  state1['params']))):
    np.testing.assert_allclose(ema, decay * p0 + (1 - decay) * p1, rtol=1e-5, atol=1e-7)

  poisoned = dict(micro['batch'], image=micro['batch']['image'].at[0].set(jnp.nan))
  state2, m2 = step_fn(state1, poisoned)
  assert not bool(m2['finite']) and int(state2['skipped_steps']) == 1
  assert int(state2['step']) == 2
  for key in ('params', 'ema_params', 'opt_state'):
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                            state2[key], state1[key]))), key
  _, m3 = step_fn(state2, micro['batch'])
  # The schedule counts applied updates only.
  np.testing.assert_allclose(m3['train/lr'], micro['schedule'](1), rtol=1e-6)


def test_gradient_accumulation_matches_one_big_batch(micro, first_step):
  config = micro['config'].copy_and_resolve_references()
  config.optimizer.accum_steps = 4
  accum, m_accum = _step_fn(micro, config)(micro['state'], micro['batch'])
  whole, m_whole = first_step[1]
  np.testing.assert_allclose(m_accum['train/loss'], m_whole['train/loss'], rtol=1e-5)
  np.testing.assert_allclose(m_accum['train/grad_norm'], m_whole['train/grad_norm'], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(accum['params']), jax.tree.leaves(whole['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sub_batches_match_one_whole_batch_in_the_train_and_eval_steps(micro, first_step):
  whole, m_whole = first_step[1]
  for accum, sub in ((1, 4), (2, 2)):
    config = micro['config'].copy_and_resolve_references()
    config.optimizer.accum_steps, config.sub_batches = accum, sub
    split, m_split = _step_fn(micro, config)(micro['state'], micro['batch'])
    np.testing.assert_allclose(m_split['train/loss'], m_whole['train/loss'], rtol=1e-5)
    np.testing.assert_allclose(m_split['train/grad_norm'], m_whole['train/grad_norm'], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(split['params']), jax.tree.leaves(whole['params'])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Labelled with the whole batch's own predictions, every image is right only in batch order.
  leaves, tree = jax.tree.flatten(micro['state']['params'])
  keys = jax.random.split(jax.random.key(5), len(leaves))   # random params: varied predictions
  params = tree.unflatten([p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  images = micro['batch']['image']
  labels = micro['model'].apply({'params': params}, images).argmax(-1)
  assert len(set(labels.tolist())) > 1
  batch = {'image': images, 'label': labels, 'mask': jnp.ones(16, bool)}
  counts = jax.jit(train.make_eval_step(micro['model'], 10, 4))(params, params, batch)
  assert float(counts['val/top1']) == float(counts['ema_val/top1']) == 16


def test_sub_batches_keep_the_batch_order_and_fold_the_key_per_sub_batch():
  rows = jnp.arange(12.0)[:, None]
  key = jax.random.key(3)
  noisy = lambda x, k: x + jax.random.uniform(k, x.shape)   # noise in [0, 1): row stays in floor
  out = apply_in_sub_batches(noisy, rows, 4, key)
  np.testing.assert_array_equal(jnp.floor(out), rows)
  # Sub-batch j holds rows j, j + 4, j + 8 and draws from fold_in(key, j).
  np.testing.assert_array_equal(out[1::4], noisy(rows[1::4], jax.random.fold_in(key, 1)))
  np.testing.assert_array_equal(apply_in_sub_batches(noisy, rows, 1, key), noisy(rows, key))
  with pytest.raises(ValueError, match='A batch of 12 does not split into 5 sub-batches'):
    apply_in_sub_batches(noisy, rows, 5, key)


def test_bfloat16_compute_keeps_float32_params_and_loss(micro, first_step):
  model = create_model(micro['config'].model.name, num_classes=10, drop_path_rate=0.0,
                       dtype='bfloat16', **MICRO_MODEL)
  step_fn = jax.jit(train.make_train_step(model, micro['tx'], micro['schedule'],
                                          micro['config'], micro['mesh']))
  state, m = step_fn(micro['state'], micro['batch'])
  assert m['train/loss'].dtype == jnp.float32 and bool(m['finite'])
  float32_loss = first_step[1][1]['train/loss']
  np.testing.assert_allclose(m['train/loss'], float32_loss, atol=0.05)
  assert {x.dtype for x in jax.tree.leaves((state['params'], state['opt_state']))} <= {
      jnp.dtype('float32'), jnp.dtype('int32')}


def test_nonfinite_logits_count_as_wrong():
  logits = jnp.array([[0.1, 2.0, 0.3], [jnp.nan] * 3, [jnp.inf, 1.0, 0.0], [1.0, jnp.nan, 0.0]])
  labels = jnp.array([1, 0, 0, 0])
  np.testing.assert_array_equal(metrics_lib.topk_correct(logits, labels, 1),
                                [True, False, False, False])
  np.testing.assert_array_equal(metrics_lib.topk_correct(logits, labels, 3),
                                [True, False, False, False])


def test_metrics_jsonl_is_strict_json_with_null_for_nonfinite_values(tmp_path):
  class Silent:
    def write_scalars(self, step, scalars):
      del step, scalars
  writer = metrics_lib.JsonlTee(Silent(), str(tmp_path))
  writer.write_scalars(3, {'train/loss': np.float32(np.nan), 'train/grad_norm': np.inf,
                           'train/lr': 0.5})
  line = (tmp_path / 'metrics.jsonl').read_text()
  assert json.loads(line, parse_constant=pytest.fail) == {
      'step': 3, 'train/loss': None, 'train/grad_norm': None, 'train/lr': 0.5}


def test_skip_policy_stops_after_nan_skip_limit_nonfinite_steps_in_a_row():
  check = train._FiniteCheck('skip', skip_limit=3)  # pylint: disable=protected-access
  def metrics(finite, skipped):
    return {'finite': np.bool_(finite), 'train/loss': np.float32(np.nan if not finite else 1.0),
            'train/grad_norm': np.float32(1.0), 'train/skipped_steps': np.int32(skipped)}
  for step, finite in enumerate([False, False, True, False, False], 1):  # never 3 in a row
    check(step, metrics(finite, step))
  check(6, metrics(False, 5))
  with pytest.raises(FloatingPointError, match=r'3 steps in a row up to step 6 had a non-finite '
                                               r'loss .*the model diverged.* Lower '
                                               r'config.optimizer.base_lr'):
    check.flush()


def test_a_short_run_of_the_loop_lowers_the_loss(main_env, tmp_path):
  # 64 training images seen 15 times: the loop must fit them.
  run_main(main_env, tmp_path, '--config.train_split=train[:64]', '--config.input.augment=none',
           '--config.num_train_steps=30', '--config.log_every_steps=3',
           '--config.checkpoint_every_steps=0', '--config.optimizer.base_lr=0.004')
  losses = by_step(read_metrics(tmp_path), 'train/loss')
  first, last = np.mean([losses[3], losses[6]]), np.mean([losses[27], losses[30]])
  assert last < first - 0.3, losses


# Runs the trainer on the smoke config with step 3's images poisoned by NaN.
NAN_DRIVER = """
import sys
import numpy as np
from conftest import smoke_config
from sparseformer_jax.trainer import train
from sparseformer_jax.data import input_pipeline
real_iterator = input_pipeline.create_train_iterator

def poisoned(config, *, start_step=0, **kwargs):
  for step, batch in enumerate(real_iterator(config, start_step=start_step, **kwargs),
                               start_step + 1):
    yield dict(batch, image=batch['image'] * np.nan) if step == 3 else batch

input_pipeline.create_train_iterator = poisoned
config = smoke_config()
config.checkpoint_every_steps = 2
config.nan_policy = sys.argv[2]
train.train_and_evaluate(config, sys.argv[1])
"""


def test_nan_stops_at_its_step_keeping_checkpoints_then_skip_policy_counts_it(
    smoke_run, main_env, tmp_path):
  del smoke_run  # Ran first: its compiled programs are these runs' (the compilation cache).
  failed = run_python(main_env, NAN_DRIVER, str(tmp_path), 'raise', check=False)
  assert failed.returncode != 0
  assert 'FloatingPointError: Non-finite loss or gradient at step 3' in failed.stderr
  assert 'Lower config.optimizer.base_lr or config.optimizer.grad_clip_norm' in failed.stderr
  checkpoints = tmp_path / 'checkpoints'
  assert sorted(p.name for p in checkpoints.iterdir()) == ['2']  # the last good one, intact
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restore_numpy(tmp_path, 2)))

  resumed = run_python(main_env, NAN_DRIVER, str(tmp_path), 'skip')
  assert 'Skipped step 3' in resumed.stderr
  records = read_metrics(tmp_path)
  assert by_step(records, 'train/skipped_steps')[12] == 1
  assert np.isfinite(by_step(records, 'train/loss')[12])
  assert int(restore_numpy(tmp_path, 12)['skipped_steps']) == 1
