"""SIGTERM (the preemption notice on Cloud TPU) -> every process stops at the same step.

Single process: a Python SIGTERM handler sets a flag that the train loop polls. Several
processes: JAX's preemption service (started by jax.distributed.initialize) already catches
SIGTERM on any host and agrees on a step at which all of them stop; polling it each step is how
it is used, so both cases share `reached(step)`.
"""
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """`reached(step)` turns True (at the same step on all processes) after a SIGTERM."""

  def __init__(self):
    self._notified = False
    self._previous_handler = None
    # Python runs signal handlers in the main thread only; elsewhere (a notebook's worker
    # thread) SIGTERM keeps its default meaning.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint after the current step, then '
                    'stopping.')
    self._notified = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._notified

  def close(self):
    """Gives SIGTERM back its previous handler (train_and_evaluate may run again in-process)."""
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None
