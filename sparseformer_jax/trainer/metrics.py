"""Losses, top-k counts and where scalars go (TensorBoard + console via clu, and metrics.jsonl)."""
import json
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from clu import metric_writers
from etils import epath

METRICS_FILE = 'metrics.jsonl'


def soft_target_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """Mean over the batch of -sum(targets * log_softmax(logits)); logits, targets (B, classes)."""
  logits = logits.astype(jnp.float32)
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def topk_correct(logits: jnp.ndarray, labels: jnp.ndarray, k: int) -> jnp.ndarray:
  """(B,) bool: is the label among the k largest logits? Ties count against the label, and so
  does a non-finite logit (NaN compares false: a diverged model would otherwise be all right)."""
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)  # (B, 1)
  finite = jnp.all(jnp.isfinite(logits), axis=-1)
  return (jnp.sum(logits > label_logit, axis=-1) < k) & finite


def _json_number(value):
  """A float, or None where JSON has no number (NaN, inf)."""
  value = float(value)
  return value if math.isfinite(value) else None


class JsonlTee:
  """A clu MetricWriter that also appends each scalar set to metrics.jsonl, for scripts.

  One strict JSON object per line: {"step": s, name: value, ...}, a non-finite value as null.
  Everything else is delegated.
  """

  def __init__(self, writer: metric_writers.MetricWriter, workdir: str):
    self._writer = writer
    self._path = epath.Path(workdir) / METRICS_FILE

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._writer.write_scalars(step, scalars)
    record = {'step': int(step), **{k: _json_number(v) for k, v in scalars.items()}}
    with self._path.open('a') as f:  # Opened per line: a killed run leaves whole lines.
      f.write(json.dumps(record, allow_nan=False) + '\n')

  def __getattr__(self, name):
    return getattr(self._writer, name)


def create_writer(workdir: str):
  """TensorBoard events + console + metrics.jsonl on process 0; console only elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return JsonlTee(metric_writers.create_default_writer(workdir, asynchronous=False), workdir)


def _parse(line: str):
  """The record of one line, or None for a line torn by a killed process."""
  try:
    return json.loads(line)
  except json.JSONDecodeError:
    return None


def recorded_eval(workdir: str, step: int) -> dict:
  """The val/* and ema_val/* scalars metrics.jsonl holds for `step` ({} if none)."""
  path = epath.Path(workdir) / METRICS_FILE
  merged = {}
  if path.exists():
    for line in path.read_text().splitlines():
      record = _parse(line)
      if record is not None and record.get('step') == step:
        merged.update({k: v for k, v in record.items() if k.startswith(('val/', 'ema_val/'))})
  return merged


def truncate_metrics_file(workdir: str, last_step: int) -> None:
  """Drops metrics.jsonl lines after `last_step`: a resumed run re-logs those steps itself."""
  path = epath.Path(workdir) / METRICS_FILE
  if jax.process_index() > 0 or not path.exists():
    return
  lines = [line for line in path.read_text().splitlines()
           if (record := _parse(line)) is not None and record['step'] <= last_step]
  tmp = path.parent / (METRICS_FILE + '.tmp')
  try:
    tmp.write_text(''.join(line + '\n' for line in lines))
  except OSError:  # A full disk: the old file stays as it was.
    tmp.unlink(missing_ok=True)
    raise
  tmp.replace(path)  # Atomic: a kill leaves the old or the new file.
