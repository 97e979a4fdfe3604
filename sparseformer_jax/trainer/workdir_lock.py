"""One run per workdir: an exclusive lock file, `<workdir>/run.lock`, naming its holder.

Two runs on one workdir (a second terminal, a job restarted while the old one still runs) would
delete each other's in-flight saves and interleave metrics.jsonl, so the second refuses at start,
naming the first's host and pid. On a local or NFS disk the lock is a kernel lock (fcntl.flock)
on the file: it dies with its process, so a run killed with -9 never blocks the next one, which
takes the lock over with a warning naming the dead run. On object stores (gs://...), which have
no locks, the file's content is the lock: a lock of this host whose process is gone is taken
over; one of another host is refused, and the message says how to clear it. A multi-host job
takes one lock, on process 0; the others learn whether it succeeded.
"""
import fcntl
import json
import os
import socket

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

LOCK_FILE = 'run.lock'


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def _has_locks(workdir: str) -> bool:
  """Local and NFS disks have fcntl locks; object stores (gs://, s3://) do not."""
  return '://' not in str(workdir)


def _start_time(pid: int):
  """The process's start time in clock ticks since boot (tells a reused pid apart), or None."""
  try:
    stat = epath.Path(f'/proc/{pid}/stat').read_text()
  except OSError:
    return None
  return stat.rsplit(')', 1)[1].split()[19]  # field 22 of proc(5), counted after the name


def _this_process() -> dict:
  pid = os.getpid()
  return {'host': socket.gethostname(), 'pid': pid, 'start': _start_time(pid)}


def _describe(owner: dict) -> str:
  return f"process {owner.get('pid')} on host {owner.get('host')}"


def _is_running_here(owner: dict) -> bool:
  """Whether `owner` (of this host) is a live process, and the same one (not a reused pid)."""
  try:
    os.kill(int(owner['pid']), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  except (KeyError, TypeError, ValueError):
    return False
  start = owner.get('start')
  return start is None or _start_time(int(owner['pid'])) == start


def _read_owner(text: str) -> dict:
  try:
    owner = json.loads(text)
  except json.JSONDecodeError:
    return {}
  return owner if isinstance(owner, dict) else {}


class WorkdirLock:
  """Holds `<workdir>/run.lock` from construction until release() (or the process's end)."""

  def __init__(self, workdir: str):
    self.path = epath.Path(workdir) / LOCK_FILE
    self._file = None
    self._remote = not _has_locks(workdir)
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire_remote() if self._remote else self._acquire_local()
      except WorkdirLockedError as e:
        error = e
    if jax.process_count() > 1:  # One lock for the job: every process learns process 0's result.
      taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if error is None and not taken:
        error = WorkdirLockedError(f'Process 0 could not lock {self.path}; see its log.')
    if error is not None:
      raise error

  def _refusal(self, owner: dict) -> WorkdirLockedError:
    return WorkdirLockedError(
        f'The workdir {self.path.parent} is in use by {_describe(owner)} (lock {self.path}): '
        'wait for that run to end or stop it, or pass another --workdir.')

  def _acquire_local(self) -> None:
    file = open(self.path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      file.seek(0)
      owner = _read_owner(file.read())
      file.close()
      raise self._refusal(owner) from None
    file.seek(0)
    previous = _read_owner(file.read())
    if previous:  # A run that ended without releasing: killed, or its host lost.
      logging.warning('Taking over the lock %s of %s, which ended without releasing it (killed?).',
                      self.path, _describe(previous))
    file.seek(0)
    file.truncate()
    file.write(json.dumps(_this_process()) + '\n')
    file.flush()
    self._file = file

  def _acquire_remote(self) -> None:
    if self.path.exists():
      owner = _read_owner(self.path.read_text())
      if owner.get('host') != socket.gethostname() or _is_running_here(owner):
        error = self._refusal(owner)
        raise WorkdirLockedError(f'{error} If that run is gone (its host was lost), delete '
                                 f'{self.path}.')
      logging.warning('Taking over the lock %s of %s, which is no longer running.', self.path,
                      _describe(owner))
    self.path.write_text(json.dumps(_this_process()) + '\n')
    self._file = self.path

  def release(self) -> None:
    """Frees the workdir (an emptied lock file stays: removing it would race with a new taker)."""
    if self._file is None:
      return
    if self._remote:
      self.path.unlink(missing_ok=True)
    else:
      self._file.seek(0)
      self._file.truncate()
      self._file.close()  # Closing drops the flock.
    self._file = None
