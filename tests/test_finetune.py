"""Fine-tuning: layer-wise lr decay, frozen params, configs/finetune.py, a folder end to end."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import common
from configs import finetune
from conftest import REPO, checkpoint_metadata, read_metrics, restore_numpy, xla_flags
import image_folder_helpers as helpers
from sparseformer_jax import NORMALIZATION, create_model, load_torch_checkpoint
from sparseformer_jax.data import image_folder
from sparseformer_jax.trainer import config_schema
from sparseformer_jax.trainer import optim
from sparseformer_jax.trainer import sharding
from sparseformer_jax.trainer import train
from sparseformer_jax.weights import pretrained

# The official tiny fixture's model fields (tests/fixtures/sf_v1_tiny_*.pth).
FIXTURE_MODEL = dict(conv_dim=32, num_tokens=16, num_points=36, focusing_width=64,
                     cortex_width=128, cortex_depth=3)

LR = 1e-2


@functools.lru_cache
def _params(num_classes=3):
  """Random params of the smoke model's shapes (nothing compiled)."""
  model = create_model('sparseformer_v1_tiny', num_classes=num_classes, **common.SMOKE_MODEL)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))['params']
  rng = np.random.default_rng(num_classes)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def _opt_config(**fields):
  config = config_schema.base_config().optimizer
  config.update({'weight_decay': 0.0, 'grad_clip_norm': 0.0, **fields})
  return config


def _tx(opt_config):
  return optim.with_finetuning(optim.create_optimizer(opt_config, optax.constant_schedule(LR)),
                               opt_config)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def test_layer_decay_gives_each_unit_its_lr():
  params = _params()
  tx = _tx(_opt_config(layer_decay=0.5))
  grads = jax.tree.map(jnp.ones_like, params)
  # Adam's first step: -lr * sign(g).
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # 2 cortex units: head 1, unit_1 1/2, unit_0 (and the transition) 1/4, focusing 1/8,
  # stem, initial embedding / RoIs 1/16.
  expected = {'head': 1, 'head_norm': 1, 'cortex/unit_1': 0.5, 'cortex/unit_0': 0.25,
              'transition': 0.25, 'transition_norm': 0.25, 'focusing': 0.125,
              'stem': 0.0625, 'initial_embedding': 0.0625, 'initial_roi': 0.0625}
  for name, update in _flat(updates).items():
    group = next(g for g in expected if name == g or name.startswith(g + '/'))
    np.testing.assert_allclose(update, -LR * expected[group], rtol=1e-5, err_msg=name)


def test_frozen_params_stay_bit_equal_and_hold_no_optimizer_state():
  params = _params()
  opt_config = _opt_config(frozen='stem, cortex/unit_0', weight_decay=0.05, grad_clip_norm=1.0)
  tx = _tx(opt_config)
  state = tx.init(params)
  ema = params
  rng = np.random.default_rng(0)
  new = params
  update = jax.jit(tx.update)
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), new)
    updates, state = update(grads, state, new)
    new = optax.apply_updates(new, updates)
    ema = optim.ema_update(ema, new, 0.9999)
  frozen = [n for n in _flat(params) if n.startswith(('stem/', 'cortex/unit_0/'))]
  assert frozen
  for name in _flat(params):
    equal = np.array_equal(_flat(new)[name], _flat(params)[name])
    assert equal == (name in frozen), name
    if name in frozen:
      np.testing.assert_array_equal(_flat(ema)[name], _flat(params)[name])
  sizes = {n: p.size for n, p in _flat(params).items()}
  trainable = sum(s for n, s in sizes.items() if n not in frozen)
  state_size = sum(leaf.size for leaf in jax.tree.leaves(state) if leaf.ndim)
  assert state_size == 2 * trainable   # Adam's mu and nu of the trainable params only


def test_linear_probe_trains_the_head_only():
  params = _params()
  mask = _flat(optim.frozen_mask(params, _opt_config(linear_probe=True)))
  assert sorted(n for n, frozen in mask.items() if not frozen) == ['head/bias', 'head/kernel']
  overview = train.parameter_overview(params, _opt_config(linear_probe=True, layer_decay=0.5))
  head = sum(p.size for n, p in _flat(params).items() if n.startswith('head/'))
  assert f'{head:,} trainable' in overview and 'cortex/unit_0' in overview
  assert '0.0625' in overview   # the stem's lr multiplier


def test_bad_finetuning_fields_name_the_field():
  with pytest.raises(config_schema.ConfigError, match='stm'):
    optim.frozen_mask(_params(), _opt_config(frozen='stm'))
  config = common.smoke(config_schema.base_config())
  config.optimizer.layer_decay = 0.0
  with pytest.raises(config_schema.ConfigError, match='layer_decay'):
    config_schema.validate_config(config)


def test_finetune_config_takes_the_model_from_its_source(tmp_path):
  config = finetune.get_config('dataset=pics,init=sparseformer_btsp_augreg_base')
  assert config.model.name == 'sparseformer_btsp_augreg_base' and config.init_skip == 'head'
  assert (tuple(config.input.mean), tuple(config.input.std)) == NORMALIZATION[config.model.name]
  source = common.smoke(config_schema.base_config())
  source.input.image_size = 96
  (tmp_path / 'config.json').write_text(source.to_json_best_effort())
  config = finetune.get_config(f'dataset=pics,init={tmp_path / "checkpoints" / "12"}')
  assert config.model.overrides.conv_dim == common.SMOKE_MODEL['conv_dim']
  assert config.input.image_size == 96
  config_schema.validate_config(config)
  for arg, needle in (('dataset=pics', 'init'), ('dataset=pics,init=/nowhere', 'model=NAME'),
                      ('dataset=pics,init=x,lr=1', 'lr=1')):
    with pytest.raises(ValueError, match=needle):
      finetune.get_config(arg)


@pytest.mark.parametrize('by_name', [True, False])
def test_official_weights_load_by_variant_name_or_pth(monkeypatch, tmp_path, by_name):
  """init_from=<variant> reads its release file through load_pretrained (here the fixture behind
  a file:// URL); init_from=FILE.pth reads the file; the head (init_skip) stays new."""
  fixture = REPO / 'tests' / 'fixtures' / 'sf_v1_tiny_library_format.pth'
  monkeypatch.setitem(pretrained.PRETRAINED_URLS, 'sparseformer_v1_tiny', fixture.as_uri())
  monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / 'cache'))
  config = common.smoke(config_schema.base_config())
  config.model.overrides.update(FIXTURE_MODEL)
  config.init_from = 'sparseformer_v1_tiny' if by_name else str(fixture)
  config.init_skip = 'head'
  model = create_model('sparseformer_v1_tiny', num_classes=3, **FIXTURE_MODEL)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))['params']
  mesh = sharding.create_mesh(config.mesh)
  shardings = sharding.state_shardings({'params': shapes}, mesh)
  loaded = _flat(train.load_init_weights(config, {'params': shapes}, shardings, mesh)['params'])
  official = _flat(load_torch_checkpoint(str(fixture), 'sparseformer_v1_tiny',
                                         **FIXTURE_MODEL)['params'])
  assert not any(n.startswith('head/') for n in loaded)
  assert set(loaded) == {n for n in official if not n.startswith('head/')}
  for name, value in loaded.items():
    np.testing.assert_array_equal(value, official[name])


def test_finetune_on_a_folder_of_images(tmp_path, main_env, smoke_run):
  """prepare -> configs/finetune.py from the smoke run's checkpoint (stem frozen): above-chance
  accuracy on every validation image, the stem unchanged and without optimizer state."""
  readable = helpers.write_folder(tmp_path / 'pics')
  prepared = image_folder.prepare_folder(str(tmp_path / 'pics'), 'pics', str(tmp_path / 'tfds'),
                                         val_fraction=0.25, max_side=512, seed=0, progress=False)
  assert sum(prepared.counts.values()) == len(readable)
  workdir = tmp_path / 'work'
  command = [sys.executable, str(REPO / 'main.py'), f'--workdir={workdir}',
             f'--config=configs/finetune.py:dataset=pics,init={smoke_run}',
             f'--config.data_dir={tmp_path / "tfds"}', '--config.num_train_steps=12',
             '--config.global_batch_size=16', '--config.eval_batch_size=16',
             '--config.optimizer.base_lr=0.02', '--config.optimizer.frozen=stem',
             '--config.eval_every_steps=0', '--config.log_every_steps=4',
             '--config.checkpoint_every_steps=12', '--config.roi_images=0']
  result = subprocess.run(command, env=dict(main_env, XLA_FLAGS=xla_flags(1)), cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  assert 'trainable, 2,368 frozen' in result.stderr and '| Group' in result.stderr
  final = [r for r in read_metrics(workdir) if 'val/top1' in r][-1]
  assert final['step'] == 12
  assert final['val/num_examples'] == prepared.counts['validation']
  assert final['val/top1'] > 0.5, final   # 3 classes: chance is 1/3
  tuned, source = restore_numpy(workdir, 12), restore_numpy(smoke_run, 12)
  for name, value in _flat(source['params']['stem']).items():
    for key in ('params', 'ema_params'):
      np.testing.assert_array_equal(_flat(tuned[key]['stem'])[name], value, err_msg=key)
  opt_state = ' '.join(jax.tree_util.keystr(path) for path, _ in
                       jax.tree_util.tree_flatten_with_path(
                           checkpoint_metadata(workdir, 12)['opt_state'])[0])
  assert "'stem'" not in opt_state and "'head'" in opt_state
  assert os.path.exists(workdir / 'config.json')
