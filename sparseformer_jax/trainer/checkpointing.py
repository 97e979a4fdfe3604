"""Checkpoints: periodic async saves, resume, starting weights (init_from), structure checks.

Layout: <dir>/<step>/state/ holds one Orbax pytree, the train state {'params', 'ema_params',
'opt_state', 'step', ...} (or just {'params'} for a converted PyTorch checkpoint). Orbax writes
a step into '<step>.orbax-checkpoint-tmp*' and renames it when complete (on GCS, which cannot
rename, it writes 'commit_success.txt' last instead; the rename path writes it too). So a step
directory is complete iff it holds commit_success.txt. Before a run resumes, our own interrupted
saves (tmp directories) are deleted and a step directory without its commit file is moved aside
to '<step>.incomplete'; a complete step that fails to restore (a truncated, garbage or missing
file) is moved aside to '<step>.corrupt' and the next older one is tried. Nothing but our own
tmp directories is ever deleted. A save that fails (a full disk) stops the run at once with
the error, its partial files removed, the earlier checkpoints untouched. Restores go onto the
shardings of the current mesh, whatever the device count that wrote them.
"""
import contextlib
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
  """Orbax's records: warnings and errors only, one line each, without their tracebacks."""

  def filter(self, record):
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    if record.levelno <= std_logging.INFO:
      return False
    text = record.getMessage().split(' [tensorstore_spec=')[0]
    record.msg, record.args = ' '.join(text.split())[:400], ()
    record.exc_info = record.exc_text = None
    return True


def quiet_orbax_logging() -> None:
  """Orbax narrates every save at INFO and logs each failure with its traceback (which our own
  CheckpointError then reports in one line); for command-line tools keep one line of each of
  its warnings and errors."""
  logging.get_absl_handler().addFilter(_OnlyOrbaxWarnings())


class CheckpointError(Exception):
  """A checkpoint cannot be read or written; the message says which and what to do."""


class CheckpointMismatchError(CheckpointError, ValueError):
  """A checkpoint does not fit the model/optimizer of the current config."""


def absolute(path: str) -> str:
  """`path` made absolute (Orbax refuses relative paths, and only at its first save, when the
  work is done); URLs such as gs://bucket/dir as given."""
  return str(path) if '://' in str(path) else os.path.abspath(os.path.expanduser(path))


def root_cause(error: BaseException) -> str:
  """The innermost cause of an (Orbax/TensorStore) error, as one line without its long spec."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = ' '.join((str(error) or type(error).__name__).split(' [tensorstore_spec=')[0].split())
  return text if len(text) <= 400 else f'{text[:150]} ... {text[-240:]}'  # the OS error ends it


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


def _tmp_saves(directory: epath.Path) -> list:
  """Our own saves that never completed (Orbax's tmp directories): nothing else uses them."""
  return [path for path in _step_dirs(directory)[1] if _TMP_STEP_DIR.match(path.name)]


def _move_aside(path: epath.Path, suffix: str) -> epath.Path:
  """Renames <step> to <step>.<suffix> (or .<suffix>-2, ...): out of every run's sight, kept."""
  target, n = path.parent / f'{path.name}.{suffix}', 1
  while target.exists():
    n += 1
    target = path.parent / f'{path.name}.{suffix}-{n}'
  path.rename(target)
  return target


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _set_aside_partial(directory: epath.Path) -> None:
  """Deletes our interrupted saves, moves uncommitted step directories aside (process 0)."""
  if jax.process_index() == 0:
    for path in _tmp_saves(directory):
      logging.warning('Deleting %s, a save that was interrupted; resuming from the latest '
                      'complete checkpoint.', path)
      path.rmtree()
    for path in _step_dirs(directory)[1]:
      logging.warning('Ignoring %s: it has no %s (a save cut short, or a damaged copy); moved '
                      'it aside to %s.', path, _COMMIT_FILE, _move_aside(path, 'incomplete'))
  _sync('checkpointing: partial checkpoints set aside')


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
    _set_aside_partial(self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers={ITEM: ocp.StandardCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))
    self._saving = None  # the step of the save in flight
    self._failed = False  # a save failed (and was reported)

  def latest_step(self):
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state, *, wait: bool = False) -> None:
    """Starts writing `state` in the background (waits for the previous save first)."""
    self.wait()
    self._saving = step
    with self._reporting_failure():
      self._manager.save(step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardSave(state)}),
                         force=True)
    if wait:
      self.wait()

  def check(self) -> None:
    """Raises CheckpointError now if the save in flight has failed (cheap: call it every step)."""
    if self._saving is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight to commit; CheckpointError if it failed."""
    if self._saving is not None:
      with self._reporting_failure():
        self._manager.wait_until_finished()
      self._saving = None

  @contextlib.contextmanager
  def _reporting_failure(self):
    """A failed save -> its partial files removed, and one CheckpointError naming the fix."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-exception-caught
      step, self._saving, self._failed = self._saving, None, True
      if jax.process_index() == 0:
        for path in _tmp_saves(self.directory):
          path.rmtree(missing_ok=True)
      complete = _step_dirs(self.directory)[0]
      kept = (f'the complete checkpoints ({", ".join(map(str, complete))}) are intact'
              if complete else 'there is no earlier checkpoint')
      raise CheckpointError(
          f'Saving the checkpoint of step {step} into {self.directory} failed ({root_cause(e)}); '
          f'the run stopped, {kept}. Free space (or fix the write error) and run the same '
          'command again to resume.') from e

  def restore_latest(self, abstract_state):
    """(step, state) of the newest checkpoint that restores, or None if there is none.

    A checkpoint that fails to restore (damaged files) is moved aside to <step>.corrupt with a
    warning naming it, when an older one restores; if none does, CheckpointError lists them
    all and nothing is moved. One of another model (CheckpointMismatchError) is never skipped.
    """
    failures = []
    for step in reversed(self._manager.all_steps()):
      try:
        state = self.restore(step, abstract_state)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-exception-caught
        failures.append((step, root_cause(e)))
        continue
      for bad, reason in failures:
        if jax.process_index() == 0:
          target = _move_aside(self.directory / str(bad), 'corrupt')
          logging.warning('The checkpoint %s does not restore (%s): moved it aside to %s and '
                          'resumed from step %d.', self.directory / str(bad), reason, target, step)
      if failures:
        _sync('checkpointing: damaged checkpoints moved aside')
        self._manager.reload()
      return step, state
    if failures:
      raise CheckpointError(
          f'No checkpoint in {self.directory} restores: '
          + '; '.join(f'step {step}: {reason}' for step, reason in failures)
          + '. Restore them from a copy, or move them aside (mv <step> <step>.corrupt) to start '
          'afresh, or pass another --workdir.')
    return None

  def restore(self, step: int, abstract_state):
    """The state at `step` on the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    found = self._manager.item_metadata(step)[ITEM]
    check_structure(abstract_state, found.tree, f'{self.directory / str(step)}')
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardRestore(abstract_state)}))
    return restored[ITEM]

  def close(self) -> None:
    """Waits for a save in flight to commit (CheckpointError if it failed)."""
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-exception-caught
        if not self._failed:  # Else Orbax repeats the failure that was reported already.
          raise


def _resolve(path: str):
  """(checkpoints directory, step) from a workdir, a checkpoints directory or a step directory."""
  path = epath.Path(absolute(path))  # e.g. init_from=converted/sf_t
  if not path.is_dir():
    raise FileNotFoundError(
        f'{path} is {"not a directory" if path.exists() else "not there"}: init_from takes a '
        'workdir, its checkpoints directory, a step directory, or the --out of '
        'scripts/convert_checkpoint.py.')
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
