"""Training and evaluation of SparseFormer, in one function read top to bottom.

checks -> mesh -> data -> model & optimizer -> state shapes & shardings -> resume / init_from /
fresh init -> jitted steps -> loop (log, eval, checkpoint, SIGTERM) -> final eval.

Reliability rules: the data position is a function of the step (a resumed run sees the same
examples as an uninterrupted one); the dropout key of step s is fold_in(key, s); a step whose
loss or gradient is not finite is never applied ('raise' stops the run at it, before any later
checkpoint; 'skip' counts it); SIGTERM saves a checkpoint at the current step and returns.
"""
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import periodic_actions
from etils import epath
from flax import traverse_util

from sparseformer_jax.trainer import bootstrap
from sparseformer_jax.trainer import checkpointing
from sparseformer_jax.trainer import config_schema
from sparseformer_jax import create_model
from sparseformer_jax.trainer import metrics as metrics_lib
from sparseformer_jax.trainer import optim
from sparseformer_jax.trainer import preemption
from sparseformer_jax.trainer import sharding
from sparseformer_jax import token_intermediates
from sparseformer_jax.ops.sub_batches import apply_in_sub_batches
from sparseformer_jax.analysis import visualize
from sparseformer_jax.ops import xla_cpu
from sparseformer_jax.data import input_pipeline
from sparseformer_jax.weights import inflate


def _prepare_workdir(config, workdir: str) -> None:
  """Creates the workdir, proves it writable, and records the config (process 0)."""
  path = epath.Path(workdir)
  probe = path / f'.write_probe_{jax.process_index()}'
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise config_schema.ConfigError(
        f'The workdir {workdir} is not writable ({e}); pass a --workdir you can write to.'
    ) from e
  if jax.process_index() == 0:
    (path / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')


def _build_model(config, num_classes: int):
  """create_model from the config, with its errors pointed at the config fields."""
  overrides = {k: v for k, v in config.model.overrides.to_dict().items() if v is not None}
  try:
    model = create_model(config.model.name, num_classes=num_classes, dtype=config.dtype,
                         drop_path_rate=config.model.drop_path_rate, **overrides)
  except (ValueError, TypeError) as e:
    raise config_schema.ConfigError(
        f'config.model (name={config.model.name!r}, overrides={overrides}): {e}') from e
  if model.config.video != (config.input.num_frames > 0):
    raise config_schema.ConfigError(
        f'config.input.num_frames={config.input.num_frames} does not fit a model with '
        f'video={model.config.video}: video models (config.model.overrides.video=True) take '
        'clips (num_frames > 0), image models take images (num_frames = 0).')
  return model


def _dataset_info(config) -> dict:
  try:
    return input_pipeline.get_dataset_info(config)
  except FileNotFoundError as e:
    raise config_schema.ConfigError(f'config.dataset={config.dataset!r}: {e}') from e


def _schedule_steps(config, num_train_examples: int):
  """(total steps, warm-up steps, eval interval in steps; 0 = only at the end)."""
  steps_per_epoch = num_train_examples / config.global_batch_size
  total = (config.num_train_steps if config.num_train_steps > 0
           else math.ceil(config.num_epochs * steps_per_epoch))
  warmup = round(config.warmup_epochs * steps_per_epoch)
  eval_every = (math.ceil(steps_per_epoch) if config.eval_every_steps == -1
                else config.eval_every_steps)
  return total, warmup, eval_every


# Independent PRNG streams folded into jax.random.key(config.seed); made inside jit, so nothing
# runs on a device before every check has passed.
_INIT_STREAM, _DROPOUT_STREAM = 0, 1


def _stream_key(seed: int, stream: int):
  return jax.random.fold_in(jax.random.key(seed), stream)


def make_init_fn(model, tx, config):
  """() -> the initial train state; jit it with out_shardings to build it in place."""
  frames, size = config.input.num_frames, config.input.image_size
  sample_shape = (1,) + ((frames,) if frames else ()) + (size, size, 3)  # an image or a clip

  def init_state():
    params = model.init({'params': _stream_key(config.seed, _INIT_STREAM)},
                        jnp.zeros(sample_shape), train=False)['params']
    return {'step': jnp.zeros((), jnp.int32), 'skipped_steps': jnp.zeros((), jnp.int32),
            'params': params, 'ema_params': params, 'opt_state': tx.init(params)}
  return init_state


def make_train_step(model, tx, schedule, config, mesh, task=None):
  """(state, batch[, teacher_params]) -> (state, metrics): one optimizer update, over
  accum_steps micro-batches. With a bootstrap `task` the targets are the teacher's outputs."""
  accum = config.optimizer.accum_steps
  ema_decay = config.optimizer.ema_decay

  def loss_fn(params, images, targets, key):
    if task:
      params = task.stop_frozen(params)
    logits = apply_in_sub_batches(
        lambda x, k: model.apply({'params': params}, x, train=True, rngs={'dropout': k}),
        images, config.sub_batches, key)
    if task:
      return bootstrap.alignment_loss(logits, targets)
    return metrics_lib.soft_target_cross_entropy(logits, targets)

  def loss_and_grads(params, batch, key):
    if accum == 1:
      return jax.value_and_grad(loss_fn)(params, batch['image'], batch['label'], key)
    # (B, ...) -> (accum, B / accum, ...) keeping every device's rows on that device.
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
    micro = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
            jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1), split), batch)

    def body(grad_sum, inputs):
      i, mb = inputs
      loss, grads = jax.value_and_grad(loss_fn)(params, mb['image'], mb['label'],
                                                jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, grad_sum, grads), loss
    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, losses = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    return losses.mean(), jax.tree.map(lambda g: g / accum, grad_sum)

  def train_step(state, batch, teacher_params=None):
    if task:  # Label-free: the teacher's outputs on the same images are the targets.
      batch = {'image': batch['image'], 'label': task.targets(teacher_params, batch['image'])}
    key = jax.random.fold_in(_stream_key(config.seed, _DROPOUT_STREAM), state['step'])
    loss, grads = loss_and_grads(state['params'], batch, key)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new_state = {
        'step': state['step'] + 1,
        'skipped_steps': state['skipped_steps'] + (~finite).astype(jnp.int32),
        # A non-finite step changes nothing but the counters.
        **optim.tree_where(finite, {
            'params': params,
            'ema_params': optim.ema_update(state['ema_params'], params, ema_decay),
            'opt_state': opt_state,
        }, {k: state[k] for k in ('params', 'ema_params', 'opt_state')}),
    }
    step_metrics = {
        'train/loss': loss, 'train/grad_norm': grad_norm, 'finite': finite,
        # The lr this update used: the schedule counts applied updates only.
        'train/lr': schedule(state['step'] - state['skipped_steps']),
        'train/skipped_steps': new_state['skipped_steps'],
    }
    return new_state, step_metrics
  return train_step


def make_eval_step(model, num_classes: int, sub_batches: int):
  """(params, ema_params, batch) -> summed correct top-1/top-5 counts of both, and the count."""
  top_k = min(5, num_classes)

  def logits_of(params, images):
    apply = lambda x: apply_in_sub_batches(
        lambda sub, _: model.apply({'params': params}, sub, train=False), x, sub_batches)
    if images.ndim == 6:  # Video eval views (B, V, T, H, W, 3): average each video's V logits.
      logits = apply(images.reshape((-1,) + images.shape[2:]))
      return logits.reshape(images.shape[:2] + logits.shape[-1:]).mean(axis=1)
    return apply(images)

  def eval_step(params, ema_params, batch):
    mask = batch['mask']
    counts = {'val/num_examples': mask.sum(dtype=jnp.int32)}
    for prefix, p in (('val', params), ('ema_val', ema_params)):
      logits = logits_of(p, batch['image'])
      for k, name in ((1, 'top1'), (top_k, 'top5')):
        correct = metrics_lib.topk_correct(logits, batch['label'], k) & mask
        counts[f'{prefix}/{name}'] = correct.sum(dtype=jnp.int32)
    return counts
  return eval_step


def evaluate(eval_step, state, config, mesh, *extra) -> dict:
  """Top-1/top-5 (or the bootstrap metrics) of params and EMA over the whole eval split, exact
  on any device count; `extra` follows the batch into eval_step (the teacher's params)."""
  local_batch = config.eval_batch_size // jax.process_count()
  totals = None
  for batch in input_pipeline.create_eval_iterator(
      config, local_batch_size=local_batch, process_index=jax.process_index(),
      process_count=jax.process_count()):
    counts = eval_step(state['params'], state['ema_params'],
                       sharding.global_batch(sharding.pad_batch(batch, local_batch), mesh), *extra)
    totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
  totals = jax.device_get(totals)
  n = int(totals['val/num_examples'])
  return {k: (n if k == 'val/num_examples' else float(v) / max(n, 1)) for k, v in totals.items()}


def make_roi_writer(model, config, writer):
  """(step, params) -> writes a picture of every token's RoI on a few validation images.

  Process 0 only, image models only, `config.roi_images` images (0 = off): a person watching
  TensorBoard sees the tokens find the objects as training goes.
  """
  if not config.roi_images or model.config.video or jax.process_index() != 0:
    return lambda step, params: None
  batch = next(iter(input_pipeline.create_eval_iterator(
      config, local_batch_size=config.roi_images, process_index=0, process_count=1)))
  images = np.asarray(batch['image'])[np.asarray(batch['mask'])]
  pixels = visualize.denormalize(images, config.input.mean, config.input.std)

  def write(step, params):
    out = token_intermediates(model, {'params': jax.device_get(params)}, images)
    writer.write_images(step, {'rois': visualize.render_rois(pixels, out, cell_size=128)[None]})
  return write


class _FiniteCheck:
  """Looks at a step's `finite` flag one step late, so the device queue never drains."""

  def __init__(self, policy: str):
    self._policy = policy
    self._pending = None

  def __call__(self, step, step_metrics):
    """Checks the previous pending step, then queues this one."""
    self.flush()
    self._pending = (step, step_metrics)

  def flush(self):
    if self._pending is None:
      return
    step, m = self._pending
    self._pending = None
    if bool(m['finite']):
      return
    loss, grad_norm = float(m['train/loss']), float(m['train/grad_norm'])
    if self._policy == 'raise':
      raise FloatingPointError(
          f'Non-finite loss or gradient at step {step} (train/loss={loss}, '
          f'train/grad_norm={grad_norm}). The update was not applied and no checkpoint after '
          f'it was written. Lower config.optimizer.base_lr or raise grad_clip_norm, or set '
          f"config.nan_policy='skip' to skip such steps.")
    logging.warning('Skipped step %d: train/loss=%s, train/grad_norm=%s (%d skipped so far).',
                    step, loss, grad_norm, int(m['train/skipped_steps']))


def load_init_weights(config, abstract, shardings, mesh) -> dict:
  """config.init_from's {'params'} (and, for eval-only, 'ema_params' if saved), on the mesh.

  With init_inflate_replicates > 0 they are image weights, inflated into this video model.
  Params under config.init_skip are left out (the caller keeps their fresh initialization).
  """
  if config.init_inflate_replicates:
    logging.info('Inflating the image params of %s into %d token replicas.', config.init_from,
                 config.init_inflate_replicates)
    image_params = checkpointing.load_saved_params(config.init_from, sharding.replicated(mesh))
    params = inflate.inflate_from_image({'params': image_params},
                                        config.init_inflate_replicates)['params']
    checkpointing.check_structure({'params': abstract['params']}, {'params': params},
                                  f'{config.init_from} (inflated)', skip=config.init_skip)
    return checkpointing.without_skipped(
        {'params': jax.device_put(params, shardings['params'])}, config.init_skip)
  # Training starts its EMA from the loaded params; eval-only evaluates a saved EMA too.
  wanted = ('params', 'ema_params') if config.eval_only else ('params',)
  return checkpointing.load_entries(config.init_from, {k: abstract[k] for k in wanted},
                                    skip=config.init_skip)


def _initial_state(config, workdir, checkpoints, init_state, abstract, shardings, mesh,
                   inherit=None):
  """The workdir's latest checkpoint (resume); else a fresh init, with init_from's weights or
  those `inherit(params)` copies in (a bootstrap teacher's)."""
  latest = checkpoints.latest_step()
  if latest is not None:
    logging.info('Resuming from %s/%d.', checkpoints.directory, latest)
    return checkpoints.restore(latest, abstract)
  if config.eval_only and not config.init_from:
    raise config_schema.ConfigError(
        f'config.eval_only needs weights: {workdir} has no checkpoint; set config.init_from.')
  state = jax.jit(init_state, out_shardings=shardings)()
  if inherit:
    state['params'] = jax.device_put(inherit(state['params']), shardings['params'])
    state['ema_params'] = jax.tree.map(jnp.copy, state['params'])
  if config.init_from:
    weights = load_init_weights(config, abstract, shardings, mesh)
    params = traverse_util.flatten_dict(state['params'])
    params.update(traverse_util.flatten_dict(weights['params']))  # all but init_skip's
    state['params'] = traverse_util.unflatten_dict(params)
    state['ema_params'] = (weights['ema_params'] if 'ema_params' in weights
                           else jax.tree.map(jnp.copy, state['params']))
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the workdir's latest checkpoint if any) and evaluates.

  Returns the last evaluation's metrics (val/top1, val/top5, ema_val/..., val/num_examples).
  """
  config_schema.validate_config(config)
  config_schema.check_against_devices(config, device_count=jax.device_count())
  mismatch = config_schema.normalization_mismatch(config)
  if mismatch:
    logging.warning(mismatch)
  _prepare_workdir(config, workdir)
  info = _dataset_info(config)
  task = (bootstrap.Bootstrap(config, info['num_classes']) if config.task == 'bootstrap'
          else None)
  model = _build_model(config, task.num_classes if task else info['num_classes'])
  mesh = sharding.create_mesh(config.mesh)
  total_steps, warmup_steps, eval_every = _schedule_steps(config, info['num_train_examples'])
  schedule = optim.learning_rate_schedule(config.optimizer,
                                          global_batch_size=config.global_batch_size,
                                          total_steps=total_steps, warmup_steps=warmup_steps)
  tx = optim.create_optimizer(config.optimizer, schedule)
  if task:
    tx = task.freeze(tx, model.config)

  init_state = make_init_fn(model, tx, config)
  # Shapes without computing anything; each array gets its sharding on the mesh.
  abstract = jax.eval_shape(init_state)
  shardings = sharding.state_shardings(abstract, mesh)
  abstract = sharding.with_shardings(abstract, shardings)
  checkpoints = checkpointing.Checkpoints(str(epath.Path(workdir) / 'checkpoints'),
                                          keep=config.keep_checkpoints)
  writer = metrics_lib.create_writer(workdir)
  watcher = preemption.PreemptionWatcher()
  try:
    state = _initial_state(config, workdir, checkpoints, init_state, abstract, shardings, mesh,
                           task and (lambda params: task.inherit(params, model.config)))
    batch_sharding = sharding.batch_sharding(mesh)
    # The bootstrap teacher's params follow the batch into the jitted steps, replicated.
    extra = (jax.device_put(task.teacher_params, sharding.replicated(mesh)),) if task else ()
    extra_shardings = (sharding.replicated(mesh),) * len(extra)
    eval_step = jax.jit(task.make_eval_step(model) if task else
                        make_eval_step(model, info['num_classes'], config.sub_batches),
                        in_shardings=(shardings['params'], shardings['ema_params'],
                                      batch_sharding, *extra_shardings),
                        out_shardings=sharding.replicated(mesh),
                        compiler_options=xla_cpu.compiler_options())
    start_step = int(state['step'])
    if config.eval_only or start_step >= total_steps:
      # A finished run, started again, evaluates its final state (an eval cut short by a
      # kill after the last checkpoint is not lost).
      results = evaluate(eval_step, state, config, mesh, *extra)
      writer.write_scalars(start_step, results)
      return results

    train_step = jax.jit(make_train_step(model, tx, schedule, config, mesh, task),
                         in_shardings=(shardings, batch_sharding, *extra_shardings),
                         out_shardings=(shardings, sharding.replicated(mesh)),
                         donate_argnums=0, compiler_options=xla_cpu.compiler_options())
    metrics_lib.truncate_metrics_file(workdir, start_step)  # Steps after it are re-run.
    train_iter = input_pipeline.create_train_iterator(
        config, local_batch_size=config.global_batch_size // jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count(),
        start_step=start_step)
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps)
    hooks = [report_progress]
    if config.profile.first_step >= 0 and jax.process_index() == 0:
      hooks.append(periodic_actions.Profile(
          logdir=workdir, num_profile_steps=config.profile.num_steps, profile_duration_ms=None,
          first_profile=config.profile.first_step, every_secs=None))
    finite_check = _FiniteCheck(config.nan_policy)
    write_rois = make_roi_writer(model, config, writer)
    results = {}
    logging.info('Training steps %d..%d on %s.', start_step + 1, total_steps, mesh)
    timer = (time.monotonic(), start_step)  # img/s: training steps only, since this point
    for step in range(start_step + 1, total_steps + 1):
      batch = sharding.global_batch(next(train_iter), mesh)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, step_metrics = train_step(state, batch, *extra)
      if step == start_step + 1:  # Compilation is no part of img/s.
        jax.block_until_ready(step_metrics)
        timer = (time.monotonic(), step)
      finite_check(step, step_metrics)
      for hook in hooks:
        hook(step)
      is_last = step == total_steps
      preempted = watcher.reached(step)
      log_now = step % config.log_every_steps == 0 or is_last
      eval_now = (eval_every and step % eval_every == 0) or is_last
      every = config.checkpoint_every_steps
      save_now = (every and step % every == 0) or is_last or preempted

      if log_now:
        finite_check.flush()
        scalars = {k: v for k, v in jax.device_get(step_metrics).items() if k != 'finite'}
        if config.nan_policy != 'skip':
          del scalars['train/skipped_steps']
        if step > timer[1]:
          scalars['train/img_per_sec'] = ((step - timer[1]) * config.global_batch_size
                                          / (time.monotonic() - timer[0]))
        writer.write_scalars(step, scalars)
      if save_now:
        finite_check.flush()  # Never save a state that followed a non-finite step.
      if save_now and preempted:  # A preemption notice leaves seconds: checkpoint before eval.
        checkpoints.save(step, state, wait=True)
      if eval_now:
        with report_progress.timed('eval'):
          results = evaluate(eval_step, state, config, mesh, *extra)
        writer.write_scalars(step, results)
        write_rois(step, state['params'])
      if save_now and not preempted:
        checkpoints.save(step, state)
      if log_now or eval_now or save_now:
        timer = (time.monotonic(), step)
      if preempted:
        logging.warning('Stopped for preemption at step %d with a checkpoint; run the same '
                        'command again to resume.', step)
        break
    finite_check.flush()
    return results
  finally:
    watcher.close()
    checkpoints.close()
    writer.flush()
