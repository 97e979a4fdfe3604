"""SIGTERM (the preemption notice on Cloud TPU) or Ctrl-C -> every process stops at the same step.

Single process: a Python handler of SIGTERM and SIGINT sets a flag that the train loop polls; a
second signal (a scheduler that repeats its notice, an impatient Ctrl-C) changes nothing, so the
checkpoint being saved is not lost; `kill -9` still stops at once. The handlers stay until
the caller's last save has committed. Several processes: JAX's preemption service (started by
jax.distributed.initialize) already catches SIGTERM on any host and agrees on a step at which
all of them stop; polling it each step is how it is used, so both cases share `reached(step)`.
"""
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

_SIGNALS = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'SIGINT (Ctrl-C)'}


class PreemptionWatcher:
  """`reached(step)` turns True (at the same step on all processes) after a SIGTERM or SIGINT."""

  def __init__(self):
    self._notified = False
    self._previous_handlers = {}
    # Python runs signal handlers in the main thread only; elsewhere (a notebook's worker
    # thread) the signals keep their default meaning.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in _SIGNALS}

  def _on_signal(self, signum, frame):
    del frame
    name = _SIGNALS[signal.Signals(signum)]
    # Set first: the next signal may run this handler again in the middle of the logging.
    already, self._notified = self._notified, True
    if already:
      logging.warning('%s received again: already stopping, the checkpoint is being saved '
                      '(kill -9 would lose it).', name)
      return
    logging.warning('%s received: saving a checkpoint after the current step, then stopping '
                    '(run the same command again to resume).', name)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._notified

  def close(self):
    """Gives the signals back their previous handlers (after the last save has committed)."""
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._previous_handlers = {}
