"""Which version of an op a trace takes: the plain one, or its XLA:CPU workaround.

The choice is made in Python while a function is traced, so a compiled program holds one
version only, without conditionals. A trace takes the XLA:CPU versions when JAX computes on the
CPU (`jax.default_backend()`) and no `cpu_workarounds(False)` encloses it: GPUs and TPUs always
get the plain ops. The trace cannot know the platforms it will later be lowered for, so code that
lowers for another platform on a CPU host (`.lower(lowering_platforms=("cuda",))`, exports)
traces inside `cpu_workarounds(False)`. jax.jit caches a function's trace: a function
traced once keeps the versions it got, so switch with a new function (a new closure).
"""
import contextlib
import contextvars

import jax

_ENABLED = contextvars.ContextVar("sparseformer_cpu_workarounds", default=True)


@contextlib.contextmanager
def cpu_workarounds(enabled: bool):
  """Context (or decorator) in which traces take the XLA:CPU versions only if `enabled`.

  `config.cpu_workarounds` and scripts/benchmark.py's `--no-cpu-workarounds` use it to run the
  plain ops on the CPU too (A/B runs, debugging); the results are the same.
  """
  token = _ENABLED.set(bool(enabled))
  try:
    yield
  finally:
    _ENABLED.reset(token)


def use_cpu_workarounds() -> bool:
  """Whether the op being traced now takes its XLA:CPU version."""
  return _ENABLED.get() and jax.default_backend() == "cpu"
