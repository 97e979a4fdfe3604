"""Training and evaluation of SparseFormer, in one function read top to bottom.

checks -> mesh -> data -> model & optimizer -> state shapes & shardings -> resume / init_from /
fresh init -> jitted steps -> loop (log, eval, checkpoint, SIGTERM) -> final eval.

Reliability rules: the data position is a function of the step (a resumed run sees the same
examples as an uninterrupted one); the dropout key of step s is fold_in(key, s); a step whose
loss or gradient is not finite is never applied ('raise' stops the run at it, before any later
checkpoint; 'skip' counts it, and stops after config.nan_skip_limit in a row); SIGTERM or
Ctrl-C saves a checkpoint at the current step and returns; one run at a time holds the workdir
(workdir_lock); a damaged checkpoint is set aside and the newest that restores is resumed; a
failed save stops the run at once (checkpointing).
"""
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview as parameter_overview_lib
from clu import periodic_actions
from etils import epath
from flax import traverse_util

from sparseformer_jax.trainer import bootstrap
from sparseformer_jax.trainer import checkpointing
from sparseformer_jax.trainer import config_schema
from sparseformer_jax import VARIANTS, create_model, load_pretrained
from sparseformer_jax.trainer import metrics as metrics_lib
from sparseformer_jax.trainer import optim
from sparseformer_jax.trainer import preemption
from sparseformer_jax.trainer import sharding
from sparseformer_jax.trainer import workdir_lock
from sparseformer_jax import token_intermediates
from sparseformer_jax.ops.sub_batches import apply_in_sub_batches
from sparseformer_jax.analysis import visualize
from sparseformer_jax import ops
from sparseformer_jax.ops import xla_cpu
from sparseformer_jax.data import input_pipeline
from sparseformer_jax.models import stem
from sparseformer_jax.weights import inflate
from sparseformer_jax.weights import pretrained


def _make_workdir(workdir: str) -> None:
  """Creates the workdir (a directory: a file of that name is refused)."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise config_schema.ConfigError(
        f'--workdir {workdir} is a file: pass a directory (it is created if missing).')
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise config_schema.ConfigError(
        f'The workdir {workdir} is not writable ({e}); pass a --workdir you can write to.'
    ) from e


def _check_writable(workdir: str) -> None:
  """Proves the workdir writable, once our own partial saves are gone (they may fill a disk)."""
  probe = epath.Path(workdir) / f'.write_probe_{jax.process_index()}'
  try:
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise config_schema.ConfigError(
        f'The workdir {workdir} is not writable ({e}); free space or pass a --workdir you can '
        'write to.') from e


def _record_config(config, workdir: str) -> None:
  """config.json (process 0, atomically), once checks and restore passed: it always describes
  the config that writes the workdir's checkpoints."""
  if jax.process_index() == 0:
    path = epath.Path(workdir) / 'config.json'
    tmp = path.parent / 'config.json.tmp'
    tmp.write_text(config.to_json_best_effort(indent=2) + '\n')
    tmp.replace(path)


def _init_numerics(config, overrides: dict) -> dict:
  """The numerics fields of official weights in init_from (a variant name, a .pth, a URL, a
  converted directory): the model computes as the code that made them, whatever the config's
  flavor (the ImageNet recipe trains in the training code's)."""
  if not (is_pretrained_source(config.init_from) or epath.Path(config.init_from).is_dir()):
    return {}   # no weights, or a path that load_init_weights reports on
  try:
    numerics = pretrained.numerics_of(config.init_from)
  except (ValueError, OSError, RuntimeError) as e:
    raise config_schema.ConfigError(f'config.init_from={config.init_from!r}: {e}') from e
  changed = {k: v for k, v in numerics.items() if overrides.get(k) != v}
  if changed:
    logging.info('config.init_from=%s holds weights made to compute with %s; the model does.',
                 config.init_from, changed)
  return numerics


def _build_model(config, num_classes: int):
  """create_model from the config, with its errors pointed at the config fields."""
  if config.input.image_size < stem.KERNEL:
    raise config_schema.ConfigError(
        f"config.input.image_size={config.input.image_size} is smaller than the stem's "
        f'{stem.KERNEL}x{stem.KERNEL} convolution: use at least {stem.KERNEL}.')
  overrides = {k: v for k, v in config.model.overrides.to_dict().items() if v is not None}
  overrides.update(_init_numerics(config, overrides))
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
  data_dir = config.data_dir
  if data_dir and '://' not in data_dir and not epath.Path(data_dir).is_dir():
    raise config_schema.ConfigError(
        f'config.data_dir={data_dir!r} is not a directory: pass your TFDS data directory '
        '(scripts/prepare_data.py fills one), or leave it unset for the TFDS default.')
  try:
    info = input_pipeline.get_dataset_info(config)
  except (FileNotFoundError, ValueError) as e:
    raise config_schema.ConfigError(f'config.dataset={config.dataset!r}: {e}') from e
  beside = input_pipeline.generated_beside_prepared(config)
  if beside:
    logging.warning(beside)
  return info


def _schedule_steps(config, num_train_examples: int):
  """(total steps, warm-up steps, eval interval in steps; 0 = only at the end).

  As the official loop counts them: an epoch is floor(N / global batch) steps (its sampler and
  drop_last), and the schedule lengths are int(epochs * steps per epoch).
  """
  steps_per_epoch = max(num_train_examples // config.global_batch_size, 1)
  total = (config.num_train_steps if config.num_train_steps > 0
           else int(config.num_epochs * steps_per_epoch))
  warmup = int(config.warmup_epochs * steps_per_epoch)
  eval_every = steps_per_epoch if config.eval_every_steps == -1 else config.eval_every_steps
  return total, warmup, eval_every


# Independent PRNG streams folded into jax.random.key(config.seed); made inside jit, so nothing
# runs on a device before every check has passed.
_INIT_STREAM, _DROPOUT_STREAM = 0, 1


def _stream_key(seed: int, stream: int):
  return jax.random.fold_in(jax.random.key(seed), stream)


@dataclasses.dataclass
class _ParamGroup:
  """A row of the parameter overview: a unit of the model (e.g. cortex/unit_3)."""
  group: str
  params: int
  share: str
  trains: str
  lr_scale: str


_OVERVIEW_GROUPS = 12  # rows of the parameter overview


def parameter_overview(params, opt_config) -> str:
  """Total and trainable (not frozen) param counts and clu's table of the largest groups, with
  their lr multiplier (optimizer.layer_decay)."""
  frozen = optim.frozen_mask(params, opt_config)
  scales = (optim.layer_decay_scales(params, opt_config.layer_decay)
            if opt_config.layer_decay < 1.0 else jax.tree.map(lambda _: 1.0, params))
  groups, group_scale = {}, {}  # group -> [params, trainable params]; group -> lr multiplier
  for (path, leaf), is_frozen, scale in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                            jax.tree.leaves(frozen), jax.tree.leaves(scales)):
    names = [str(getattr(k, 'key', k)) for k in path]
    group = '/'.join(names[:2] if names[0] == 'cortex' and len(names) > 2 else names[:1])
    size = math.prod(leaf.shape)
    group_scale[group] = scale
    counts = groups.setdefault(group, [0, 0])
    counts[0] += size
    counts[1] += 0 if is_frozen else size
  total = sum(c[0] for c in groups.values())
  trainable = sum(c[1] for c in groups.values())
  rows = [_ParamGroup(g, n, f'{n / total:.1%}', 'yes' if t == n else 'no' if t == 0 else 'partly',
                      f'{group_scale[g]:.3g}')
          for g, (n, t) in sorted(groups.items(), key=lambda item: -item[1][0])[:_OVERVIEW_GROUPS]]
  return (f'Parameters: {total:,} total, {trainable:,} trainable, {total - trainable:,} frozen. '
          f'The {len(rows)} largest of {len(groups)} groups:\n'
          + parameter_overview_lib.make_table(rows))


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
    params = optim.stop_frozen_gradients(params, config.optimizer)
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

  def __init__(self, policy: str, skip_limit: int):
    self._policy = policy
    self._skip_limit = skip_limit
    self._skipped_in_a_row = 0
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
      self._skipped_in_a_row = 0
      return
    loss, grad_norm = float(m['train/loss']), float(m['train/grad_norm'])
    fix = 'Lower config.optimizer.base_lr or config.optimizer.grad_clip_norm (a tighter clip)'
    if self._policy == 'raise':
      raise FloatingPointError(
          f'Non-finite loss or gradient at step {step} (train/loss={loss}, '
          f'train/grad_norm={grad_norm}). The update was not applied and no checkpoint after '
          f"it was written. {fix}; or set config.nan_policy='skip' to skip such steps.")
    self._skipped_in_a_row += 1
    logging.warning('Skipped step %d: train/loss=%s, train/grad_norm=%s (%d skipped so far).',
                    step, loss, grad_norm, int(m['train/skipped_steps']))
    if self._skipped_in_a_row >= self._skip_limit:
      raise FloatingPointError(
          f'{self._skipped_in_a_row} steps in a row up to step {step} had a non-finite loss or '
          'gradient (config.nan_skip_limit): the model diverged, and no checkpoint after it was '
          f'written. {fix}.')


def is_pretrained_source(init_from: str) -> bool:
  """A variant name (its official weights), a PyTorch .pth file or an http(s)/file URL."""
  return (init_from in VARIANTS and not epath.Path(init_from).exists()) or init_from.endswith(
      '.pth') or init_from.split('://')[0] in ('http', 'https', 'file')


def official_params(config) -> dict:
  """config.init_from's weights through load_pretrained (downloaded once into its cache), as a
  params tree in host memory: a variant's official release file, or a .pth / URL of them."""
  name, source = ((config.init_from, None) if config.init_from in VARIANTS
                  else (config.model.name, config.init_from))
  fields = {k: v for k, v in config.model.overrides.to_dict().items() if v is not None}
  try:
    return load_pretrained(name, source, **fields)[1]['params']
  except (ValueError, OSError, RuntimeError) as e:
    raise config_schema.ConfigError(f'config.init_from={config.init_from!r}: {e}') from e


def _on_mesh(params, source: str, config, abstract, shardings) -> dict:
  """{'params'} from host memory, checked against the model, without init_skip's, on the mesh."""
  checkpointing.check_structure({'params': abstract['params']}, {'params': params}, source,
                                skip=config.init_skip)
  kept = checkpointing.without_skipped({'params': params}, config.init_skip)
  placement = checkpointing.without_skipped({'params': shardings['params']}, config.init_skip)
  return jax.device_put(kept, placement)


def load_init_weights(config, abstract, shardings, mesh) -> dict:
  """config.init_from's {'params'} (and, for eval-only, 'ema_params' if saved), on the mesh.

  init_from is a checkpoint (see checkpointing._resolve) or a variant name (its official
  weights, a .pth or a URL: see official_params). With init_inflate_replicates > 0 they are image weights,
  inflated into this video model. Params under config.init_skip are left out (the caller keeps
  their fresh initialization).
  """
  if config.init_inflate_replicates:
    logging.info('Inflating the image params of %s into %d token replicas.', config.init_from,
                 config.init_inflate_replicates)
    image_params = checkpointing.load_saved_params(config.init_from, sharding.replicated(mesh))
    params = inflate.inflate_from_image({'params': image_params},
                                        config.init_inflate_replicates)['params']
    return _on_mesh(params, f'{config.init_from} (inflated)', config, abstract, shardings)
  if is_pretrained_source(config.init_from):
    return _on_mesh(official_params(config), config.init_from, config, abstract, shardings)
  # Training starts its EMA from the loaded params; eval-only evaluates a saved EMA too.
  wanted = ('params', 'ema_params') if config.eval_only else ('params',)
  return checkpointing.load_entries(config.init_from, {k: abstract[k] for k in wanted},
                                    skip=config.init_skip)


def _initial_state(config, workdir, checkpoints, init_state, abstract, shardings, mesh,
                   inherit=None):
  """The workdir's newest checkpoint that restores (resume); else a fresh init, with
  init_from's weights (read first: a bad init_from fails before anything compiles) or those
  `inherit(params)` copies in (a bootstrap teacher's)."""
  resumed = checkpoints.restore_latest(abstract)
  if resumed is not None:
    logging.info('Resuming from %s/%d.', checkpoints.directory, resumed[0])
    return resumed[1]
  if config.eval_only and not config.init_from:
    raise config_schema.ConfigError(
        f'config.eval_only needs weights: {workdir} has no checkpoint; set config.init_from.')
  if config.init_from:
    try:
      weights = load_init_weights(config, abstract, shardings, mesh)
    except FileNotFoundError as e:
      raise config_schema.ConfigError(f'config.init_from={config.init_from!r}: {e}') from e
  state = jax.jit(init_state, out_shardings=shardings)()
  if inherit:
    state['params'] = jax.device_put(inherit(state['params']), shardings['params'])
    state['ema_params'] = jax.tree.map(jnp.copy, state['params'])
  if config.init_from:
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
  if not str(workdir).strip():
    raise config_schema.ConfigError('--workdir is empty: pass the directory for checkpoints '
                                    'and metrics, e.g. --workdir=workdirs/run1.')
  workdir = checkpointing.absolute(workdir)
  _make_workdir(workdir)
  info = _dataset_info(config)
  task = (bootstrap.Bootstrap(config, info['num_classes']) if config.task == 'bootstrap'
          else None)
  model = _build_model(config, task.num_classes if task else info['num_classes'])
  if task:  # The params the task freezes join config.optimizer.frozen.
    config = task.with_frozen(config, model.config)
  mesh = sharding.create_mesh(config.mesh)
  total_steps, warmup_steps, eval_every = _schedule_steps(config, info['num_train_examples'])
  schedule = optim.learning_rate_schedule(config.optimizer,
                                          global_batch_size=config.global_batch_size,
                                          total_steps=total_steps, warmup_steps=warmup_steps)
  tx = optim.with_finetuning(optim.create_optimizer(config.optimizer, schedule), config.optimizer)

  init_state = make_init_fn(model, tx, config)
  # Shapes without computing anything; each array gets its sharding on the mesh.
  abstract = jax.eval_shape(init_state)
  logging.info('%s', parameter_overview(abstract['params'], config.optimizer))
  shardings = sharding.state_shardings(abstract, mesh)
  abstract = sharding.with_shardings(abstract, shardings)
  lock = workdir_lock.WorkdirLock(workdir)  # Before anything in the workdir is touched.
  try:
    checkpoints = checkpointing.Checkpoints(str(epath.Path(workdir) / 'checkpoints'),
                                            keep=config.keep_checkpoints)
    _check_writable(workdir)
  except BaseException:
    lock.release()
    raise
  writer = metrics_lib.create_writer(workdir)
  watcher = preemption.PreemptionWatcher()
  try:
    state = _initial_state(config, workdir, checkpoints, init_state, abstract, shardings, mesh,
                           task and (lambda params: task.inherit(params, model.config)))
    batch_sharding = sharding.batch_sharding(mesh)
    traced = ops.cpu_workarounds(config.cpu_workarounds)  # the op versions the steps trace
    # The bootstrap teacher's params follow the batch into the jitted steps, replicated.
    extra = (jax.device_put(task.teacher_params, sharding.replicated(mesh)),) if task else ()
    extra_shardings = (sharding.replicated(mesh),) * len(extra)
    eval_step = jax.jit(traced(task.make_eval_step(model) if task else
                               make_eval_step(model, info['num_classes'], config.sub_batches)),
                        in_shardings=(shardings['params'], shardings['ema_params'],
                                      batch_sharding, *extra_shardings),
                        out_shardings=sharding.replicated(mesh),
                        compiler_options=xla_cpu.compiler_options())
    start_step = int(state['step'])
    if config.eval_only or start_step >= total_steps:
      # A finished run, started again, evaluates its final state unless metrics.jsonl has
      # that eval already (an eval cut short by a kill after the last checkpoint is not lost).
      recorded = {} if config.eval_only else metrics_lib.recorded_eval(workdir, start_step)
      if recorded:
        logging.info('The run finished at step %d; its final evaluation is in %s.', start_step,
                     epath.Path(workdir) / metrics_lib.METRICS_FILE)
        return recorded
      results = evaluate(eval_step, state, config, mesh, *extra)
      writer.write_scalars(start_step, results)
      return results

    train_step = jax.jit(traced(make_train_step(model, tx, schedule, config, mesh, task)),
                         in_shardings=(shardings, batch_sharding, *extra_shardings),
                         out_shardings=(shardings, sharding.replicated(mesh)),
                         donate_argnums=0, compiler_options=xla_cpu.compiler_options())
    _record_config(config, workdir)
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
    finite_check = _FiniteCheck(config.nan_policy, config.nan_skip_limit)
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
      checkpoints.check()  # A failed save (a full disk) stops the run now, not at its end.
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
    try:
      checkpoints.close()  # The last save commits with the signal handlers still in place.
    finally:
      watcher.close()
      writer.flush()
      lock.release()
