"""Checkpoints: periodic async saves, resume, starting weights (init_from), structure checks.

Layout: <dir>/<step>/state/ holds one Orbax pytree, the train state {'params', 'ema_params',
'opt_state', 'step', ...} (or just {'params'} for a converted PyTorch checkpoint). Orbax writes
a step into '<step>.orbax-checkpoint-tmp*' and renames it when complete (on GCS, which cannot
rename, it writes 'commit_success.txt' last instead; the rename path writes it too). So a step
directory is complete iff it holds commit_success.txt; anything else was cut short (kill -9,
lost host) and is deleted, with a warning, before a run resumes. Restores go onto the shardings
of the current mesh, whatever the device count that wrote them.
"""
import logging as std_logging
import os
import re

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

ITEM = 'state'
_COMMIT_FILE = 'commit_success.txt'
_STEP_DIR = re.compile(r'^(\d+)$')
_TMP_STEP_DIR = re.compile(r'^(\d+)\.orbax-checkpoint-tmp')


class _OnlyOrbaxWarnings(std_logging.Filter):

  def filter(self, record):
    return record.levelno > std_logging.INFO or f'{os.sep}orbax{os.sep}' not in record.pathname


def quiet_orbax_logging() -> None:
  """Orbax narrates every save at INFO; for command-line tools keep only its warnings."""
  logging.get_absl_handler().addFilter(_OnlyOrbaxWarnings())


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model/optimizer of the current config."""


def _step_dirs(directory: epath.Path):
  """(complete steps, partial paths) under a checkpoints directory."""
  complete, partial = [], []
  if directory.exists():
    for path in directory.iterdir():
      if _STEP_DIR.match(path.name):
        if (path / _COMMIT_FILE).exists():
          complete.append(int(path.name))
        else:
          partial.append(path)
      elif _TMP_STEP_DIR.match(path.name):
        partial.append(path)
  return sorted(complete), partial


def _remove_partial(directory: epath.Path) -> None:
  """Deletes interrupted saves (process 0), so that no run ever reads or collides with them."""
  if jax.process_index() == 0:
    for path in _step_dirs(directory)[1]:
      logging.warning('Ignoring and deleting the partly written checkpoint %s (a save that was '
                      'interrupted); resuming from the latest complete one.', path)
      path.rmtree()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('checkpointing: partial checkpoints removed')


def _flat_shapes(tree) -> dict:
  """{'params/stem/kernel': shape} for a tree of arrays, ShapeDtypeStructs or Orbax metadata."""
  def name(key):
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def skip_paths(names: str):
  """'head, cls_embedding' -> a predicate on 'params/head/kernel'-style paths (the entry aside)."""
  prefixes = tuple(n.strip().strip('/') for n in names.split(',') if n.strip())
  def skipped(path: str) -> bool:
    inner = path.split('/', 1)[-1]
    return any(inner == p or inner.startswith(p + '/') for p in prefixes)
  return skipped


def check_structure(expected, found_metadata, source: str, *, prefixes=None,
                    skip: str = '') -> None:
  """Raises CheckpointMismatchError listing missing, unexpected and mis-shaped entries.

  `prefixes` limits the comparison to these top-level entries (e.g. ('params',)); params under
  `skip` (see skip_paths) are left out of it.
  """
  skipped = skip_paths(skip)
  want, have = _flat_shapes(expected), _flat_shapes(found_metadata)
  if prefixes is not None:
    have = {k: v for k, v in have.items() if k.split('/')[0] in prefixes}
  want = {k: v for k, v in want.items() if not skipped(k)}
  have = {k: v for k, v in have.items() if not skipped(k)}
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  misshaped = sorted(f'{k}: checkpoint {have[k]} vs model {want[k]}'
                     for k in set(want) & set(have) if want[k] != have[k])
  if missing or unexpected or misshaped:
    def show(title, items):
      more = f'\n    ... and {len(items) - 10} more' if len(items) > 10 else ''
      return f'\n  {title} ({len(items)}):' + ''.join(f'\n    {i}' for i in items[:10]) + more
    raise CheckpointMismatchError(
        f'The checkpoint {source} does not match the model/optimizer of this config (was it '
        'written for another model or config.model.overrides?):'
        + (show('missing in the checkpoint', missing) if missing else '')
        + (show('unexpected in the checkpoint', unexpected) if unexpected else '')
        + (show('shape differs', misshaped) if misshaped else '')
        + '\nUse the config that wrote it, or another workdir / init_from. To fine-tune weights '
        'made for another number of classes, set config.init_skip=head (a new head).')


def without_skipped(tree, skip: str):
  """`tree` ({'params': {...}, ...}) without the params under `skip` (see skip_paths)."""
  skipped = skip_paths(skip)
  flat = traverse_util.flatten_dict(tree, sep='/')
  return traverse_util.unflatten_dict(
      {tuple(k.split('/')): v for k, v in flat.items() if not skipped(k)})


class Checkpoints:
  """A directory of step checkpoints: async saves, the newest `keep` kept, restore on a mesh."""

  def __init__(self, directory: str, *, keep: int):
    self.directory = epath.Path(directory)
    _remove_partial(self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers={ITEM: ocp.StandardCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self):
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state, *, wait: bool = False) -> None:
    """Starts writing `state` in the background (waits for the previous save first)."""
    self._manager.save(step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardSave(state)}),
                       force=True)
    if wait:
      self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state):
    """The state at `step` on the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    found = self._manager.item_metadata(step)[ITEM]
    check_structure(abstract_state, found.tree, f'{self.directory / str(step)}')
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardRestore(abstract_state)}))
    return restored[ITEM]

  def close(self) -> None:
    """Waits for a save in flight to commit."""
    self._manager.wait_until_finished()
    self._manager.close()


def _resolve(path: str):
  """(checkpoints directory, step) from a workdir, a checkpoints directory or a step directory."""
  path = epath.Path(path)
  if _STEP_DIR.match(path.name) and (path / ITEM).exists():
    return path.parent, int(path.name)
  if (path / 'checkpoints').exists():
    path = path / 'checkpoints'
  steps = _step_dirs(path)[0]
  if not steps:
    raise FileNotFoundError(
        f'No complete checkpoint under {path}: init_from takes a workdir, its checkpoints '
        f'directory, a step directory, or the --out of scripts/convert_checkpoint.py.')
  return path, steps[-1]


def _weights_manager(directory):
  return ocp.CheckpointManager(directory, item_handlers={ITEM: ocp.PyTreeCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(create=False))


def load_saved_params(path: str, sharding, entry: str = 'params') -> dict:
  """The params at `path` (or another saved entry, e.g. 'ema_params') in the structure they were
  saved with, all on `sharding`.

  For weights that get transformed before they fit the model (image -> video inflation).
  """
  directory, step = _resolve(path)
  manager = _weights_manager(directory)
  found = manager.item_metadata(step)[ITEM].tree
  if entry not in found:
    raise CheckpointMismatchError(f'{directory / str(step)} holds no {entry} '
                                  f'(it has {sorted(found)}).')
  wanted = {entry: jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), found[entry])}
  restored = manager.restore(step, args=ocp.args.Composite(**{ITEM: ocp.args.PyTreeRestore(
      wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
      partial_restore=True)}))
  manager.close()
  return restored[ITEM][entry]


def load_entries(path: str, abstract: dict, skip: str = '') -> dict:
  """Restores the top-level entries of `abstract` that the checkpoint at `path` holds.

  For weights only (init_from, eval of a converted checkpoint): `abstract` is e.g.
  {'params': ..., 'ema_params': ...} of ShapeDtypeStructs with shardings; an entry the
  checkpoint lacks is left out of the result; 'params' must be there. Params under `skip`
  (see skip_paths) are neither checked nor loaded.
  """
  directory, step = _resolve(path)
  manager = _weights_manager(directory)
  found = manager.item_metadata(step)[ITEM].tree
  wanted = {k: v for k, v in abstract.items() if k in found}
  source = str(directory / str(step))
  if 'params' not in wanted:
    raise CheckpointMismatchError(f'{source} holds no params (it has {sorted(found)}).')
  check_structure(wanted, found, source, prefixes=tuple(wanted), skip=skip)
  wanted = without_skipped(wanted, skip)
  logging.info('Loading %s from %s%s', sorted(wanted), source,
               f' (not {skip}: freshly initialized)' if skip else '')
  restored = manager.restore(step, args=ocp.args.Composite(**{ITEM: ocp.args.PyTreeRestore(
      wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
      partial_restore=True)}))
  manager.close()
  return restored[ITEM]
