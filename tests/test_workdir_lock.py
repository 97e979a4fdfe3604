"""One run per workdir: a second one is refused naming the first; a dead run's lock is taken over."""
import json
import os
import socket
import subprocess
import sys

import pytest

from sparseformer_jax.trainer import workdir_lock
from sparseformer_jax.trainer.workdir_lock import WorkdirLock, WorkdirLockedError


def _dead_pid() -> int:
  """The pid of a process that has ended."""
  child = subprocess.Popen([sys.executable, '-c', ''])
  child.wait()
  return child.pid


@pytest.fixture(params=['flock', 'object store'])
def kind(request, monkeypatch):
  """Both ways of locking: fcntl locks (local, NFS), and the file's content (gs://, s3://)."""
  if request.param == 'object store':
    monkeypatch.setattr(workdir_lock, '_has_locks', lambda workdir: False)
  return request.param


def test_a_second_run_is_refused_naming_the_first_until_it_releases(tmp_path, kind):
  first = WorkdirLock(str(tmp_path))
  owner = json.loads((tmp_path / 'run.lock').read_text())
  assert owner['host'] == socket.gethostname() and owner['pid'] == os.getpid()
  with pytest.raises(WorkdirLockedError,
                     match=f'in use by process {os.getpid()} on host {socket.gethostname()} '
                           r'\(lock \S+run.lock\): wait for that run to end or stop it'):
    WorkdirLock(str(tmp_path))
  first.release()
  WorkdirLock(str(tmp_path)).release()  # free again


def test_the_lock_of_a_dead_run_is_taken_over_with_a_warning(tmp_path, kind, caplog):
  dead = {'host': socket.gethostname(), 'pid': _dead_pid(), 'start': None}
  (tmp_path / 'run.lock').write_text(json.dumps(dead))  # what a kill -9 leaves
  lock = WorkdirLock(str(tmp_path))
  assert json.loads((tmp_path / 'run.lock').read_text())['pid'] == os.getpid()
  lock.release()
  warnings = [r.getMessage() for r in caplog.records if 'Taking over the lock' in r.getMessage()]
  assert len(warnings) == 1 and f"process {dead['pid']} on host {dead['host']}" in warnings[0]


def test_an_object_store_lock_of_another_host_is_refused_with_how_to_clear_it(tmp_path,
                                                                             monkeypatch):
  monkeypatch.setattr(workdir_lock, '_has_locks', lambda workdir: False)
  (tmp_path / 'run.lock').write_text(json.dumps({'host': 'tpu-vm-7', 'pid': 1}))
  with pytest.raises(WorkdirLockedError, match='process 1 on host tpu-vm-7 .* If that run is '
                                               r'gone \(its host was lost\), delete'):
    WorkdirLock(str(tmp_path))
