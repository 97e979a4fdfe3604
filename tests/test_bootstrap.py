"""Bootstrapping a SparseFormer from a ViT teacher: the inheritance map, frozen params, the
label-free loop through main.py (its loss falls, its resume is exact)."""
import functools
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, assert_same_run, by_step, read_metrics, xla_flags
from configs import bootstrap as bootstrap_config
from configs.bootstrap import SMOKE_STUDENT, SMOKE_TEACHER
from sparseformer_jax import create_model
from sparseformer_jax.baselines.vit import Block, ViT, ViTConfig
from sparseformer_jax.models.unit import SFUnit
from sparseformer_jax.trainer import bootstrap, optim, sharding, train
from sparseformer_jax.trainer.config_schema import ConfigError
from sparseformer_jax.weights.inherit import inherit_from_vit
from sparseformer_jax.weights.vit_checkpoint import to_vision_transformer_npz

STUDENT_NAME = 'sparseformer_btsp_augreg_base'
STUDENT = {k: v for k, v in SMOKE_STUDENT.items() if v is not None}
TEACHER = ViTConfig(num_classes=10, drop_path_rate=0.0, **SMOKE_TEACHER)   # 3 blocks, width 64
FAST = {'xla_backend_optimization_level': 0}   # LLVM -O0: these tests are compile-bound


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
  """A random smoke-shaped teacher written as a vision_transformer .npz, and its params."""
  params = jax.jit(ViT(TEACHER).init, compiler_options=FAST)(
      jax.random.key(7), jnp.zeros((1, 64, 64, 3)))['params']
  path = tmp_path_factory.mktemp('teacher') / 'teacher.npz'
  to_vision_transformer_npz(params, TEACHER, path)
  return path, jax.device_get(params)


def student(abstract=False, **overrides):
  """(model, its initial params, or only their shapes)."""
  model = create_model(STUDENT_NAME, **{**STUDENT, 'num_classes': 10, **overrides})
  init = functools.partial(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  params = jax.eval_shape(init) if abstract else jax.jit(init, compiler_options=FAST)()
  return model, jax.device_get(params['params'])


def test_student_units_take_the_teachers_last_blocks_cls_and_head(teacher_file):
  _, teacher = teacher_file
  model, fresh = student()
  params, frozen = inherit_from_vit(fresh, model.config, teacher, TEACHER)
  # 3 teacher blocks; the student has 2 ViT units (cortex unit_1, unit_2): blocks 1 and 2.
  x = jax.random.normal(jax.random.key(1), (2, 5, 64))
  for unit, block in ((1, 1), (2, 2)):
    want = Block(TEACHER, 0.0).apply({'params': teacher[f'block_{block}']}, x)
    got, _ = SFUnit(model.config, 64, ('attn', 'mlp'), 1, (0.0,)).apply(
        {'params': params['cortex'][f'unit_{unit}']}, None, x, None)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)   # eps 1e-5 vs 1e-6 apart
  np.testing.assert_array_equal(params['cortex']['cls_embedding'],
                                teacher['cls_embedding'][0] + teacher['pos_embedding'][:1])
  for name in ('head_norm', 'head'):
    for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(teacher[name])):
      np.testing.assert_array_equal(a, b)
  for name in ('stem', 'focusing', 'transition', 'initial_roi', 'initial_embedding'):
    for a, b in zip(jax.tree.leaves(params[name]), jax.tree.leaves(fresh[name])):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(params['cortex']['unit_0']),
                  jax.tree.leaves(fresh['cortex']['unit_0'])):
    np.testing.assert_array_equal(a, b)   # the sampling unit has no ViT counterpart
  # Frozen from 2N/3 = block 2 on: unit_2, and the head.
  assert frozen == [('cortex', 'unit_2'), ('head_norm',), ('head',)]
  assert inherit_from_vit(fresh, model.config, teacher, TEACHER, first_frozen=1)[1][:2] == [
      ('cortex', 'unit_1'), ('cortex', 'unit_2')]


def test_a_teacher_that_does_not_fit_says_what_did_not_map(teacher_file):
  _, teacher = teacher_file
  model, fresh = student(abstract=True, num_classes=7)
  with pytest.raises(ValueError, match=r'(?s)2 student param\(s\) did not map.*head/kernel <- '
                                       r'head/kernel: teacher \(64, 10\), student \(64, 7\)'):
    inherit_from_vit(fresh, model.config, teacher, TEACHER)
  model, fresh = student(abstract=True, cortex_depth=5, quick_gelu=True)
  with pytest.raises(ValueError, match=r'4 ViT units, the teacher only 3 blocks.*quick_gelu=True'):
    inherit_from_vit(fresh, model.config, teacher, TEACHER)


def _config(teacher_path):
  return bootstrap_config.get_config(f'teacher={teacher_path},smoke')


def test_frozen_params_stay_bit_equal_and_keep_no_optimizer_state(teacher_file):
  path, teacher = teacher_file
  config = _config(path)
  task = bootstrap.Bootstrap(config, dataset_classes=10)
  model, _ = student(focusing_repeats=1)
  config = task.with_frozen(config, model.config)   # as the trainer does
  schedule = optim.learning_rate_schedule(config.optimizer, global_batch_size=512, total_steps=12,
                                          warmup_steps=0)
  tx = optim.with_finetuning(optim.create_optimizer(config.optimizer, schedule), config.optimizer)
  state = jax.jit(train.make_init_fn(model, tx, config), compiler_options=FAST)()
  state['params'] = task.inherit(state['params'], model.config)
  state['ema_params'] = state['params']
  start = jax.device_get(state['params'])
  step = jax.jit(train.make_train_step(model, tx, schedule, config,
                                       sharding.create_mesh(config.mesh), task),
                 compiler_options=FAST)
  images = jax.random.normal(jax.random.key(2), (8, 64, 64, 3))
  batch = {'image': images, 'label': jnp.full((8, 10), jnp.nan)}   # labels are never read
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch, task.teacher_params)
    losses.append(float(metrics['train/loss']))
  assert bool(metrics['finite']) and losses[-1] < losses[0], losses
  end = flax.traverse_util.flatten_dict(jax.device_get(state['params']))
  frozen = {p for p in end if bootstrap._is_frozen(p, task.frozen)}
  assert {p[:2] for p in frozen} == {('cortex', 'unit_2'), ('head_norm', 'scale'),
                                     ('head_norm', 'bias'), ('head', 'kernel'), ('head', 'bias')}
  start = flax.traverse_util.flatten_dict(start)
  for p in frozen:
    np.testing.assert_array_equal(end[p], start[p], err_msg='/'.join(p))
  moved = [p for p in end if p not in frozen and np.any(end[p] != start[p])]
  assert any(p[:2] == ('cortex', 'unit_1') for p in moved) and any(p[0] == 'focusing'
                                                                  for p in moved)
  # Adam keeps two moments of every trainable param, nothing for the frozen ones.
  state_size = sum(x.size for x in jax.tree.leaves(state['opt_state']) if x.ndim > 0)
  trainable = sum(v.size for p, v in end.items() if p not in frozen)
  assert state_size == 2 * trainable


def _run(env, workdir, teacher_path):
  command = [sys.executable, str(REPO / 'main.py'),
             f'--config=configs/bootstrap.py:teacher={teacher_path},smoke',
             '--config.log_every_steps=2', '--config.checkpoint_every_steps=4',
             f'--workdir={workdir}']
  result = subprocess.run(command, env=dict(env, XLA_FLAGS=xla_flags(1)), cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  return result


@pytest.fixture(scope='module')
def bootstrap_run(tmp_path_factory, main_env, teacher_file):
  """The uninterrupted 12-step bootstrap smoke run through main.py."""
  workdir = tmp_path_factory.mktemp('bootstrap_reference')
  _run(main_env, workdir, teacher_file[0])
  return workdir


def test_the_label_free_run_lowers_the_alignment_loss_and_reports_agreement(bootstrap_run):
  records = read_metrics(bootstrap_run)
  losses = by_step(records, 'train/loss')
  assert np.mean([losses[10], losses[12]]) < 0.8 * np.mean([losses[2], losses[4]]), losses
  final = records[-1]
  for name in ('val/cosine', 'ema_val/cosine', 'val/agreement', 'val/top1', 'val/teacher_top1'):
    assert 0.0 <= final[name] <= 1.0, (name, final)
  assert final['val/cosine'] > 0.5


def test_a_bootstrap_run_resumes_exactly(bootstrap_run, main_env, teacher_file, tmp_path):
  workdir = tmp_path / 'resumed'
  shutil.copytree(bootstrap_run / 'checkpoints' / '4', workdir / 'checkpoints' / '4')
  result = _run(main_env, workdir, teacher_file[0])
  assert 'Training steps 5..12' in result.stderr
  assert_same_run(workdir, bootstrap_run)


@pytest.mark.parametrize('arg,message', [
    ('model=sparseformer_btsp_augreg_base', 'needs teacher=SOURCE'),
    ('teacher=t.npz,tokens=3', "argument 'tokens=3'"),
    ('teacher=t.npz,model=sparseformer_v1_tiny', 'bootstrap a sparseformer_btsp_'),
])
def test_config_arguments_are_checked(arg, message):
  with pytest.raises(ValueError, match=message):
    bootstrap_config.get_config(arg)


def test_config_follows_the_variant_and_the_teacher_must_fit_the_input(teacher_file, tmp_path):
  clip = bootstrap_config.get_config('teacher=t.pth,model=sparseformer_btsp_openai_clip_base')
  assert clip.bootstrap.teacher_activation == 'quick_gelu' and clip.input.std[0] < 0.3
  config = _config(teacher_file[0])
  config.input.image_size = 96
  with pytest.raises(ConfigError, match=r'takes 64x64 images.*--config.input.image_size=64'):
    bootstrap.Bootstrap(config, dataset_classes=10)
  config.bootstrap.teacher = str(tmp_path / 'absent.npz')
  with pytest.raises(ConfigError, match='No teacher checkpoint at'):
    bootstrap.Bootstrap(config, dataset_classes=10)
