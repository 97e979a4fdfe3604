"""The malloc setting that keeps XLA:CPU's per-call temporaries mapped between calls."""
import os
import subprocess
import sys

import pytest

from sparseformer_jax import host_memory

# A jitted program with ~256 MB of temporaries, called seven times; prints the minor page faults
# of the last call. Untuned, glibc mmaps those temporaries afresh at every call.
_PROGRAM = """
import resource, sys
from sparseformer_jax import host_memory
print(host_memory.tune_malloc_for_xla_cpu(), file=sys.stderr)
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(jnp.outer(x, x)).sum(0) + jnp.cos(jnp.outer(x, x) * 2).sum(1))
x = jnp.linspace(0.0, 1.0, 5000)
for _ in range(6):   # the heap grows to its steady size over the first calls
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_a_call(switch: str) -> int:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{host_memory.ENV_SWITCH: switch})
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True,
                       check=True)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_tuned_malloc_reuses_the_temporaries_of_the_previous_call():
  untuned, tuned = _faults_of_a_call("0"), _faults_of_a_call("1")
  assert untuned > 20_000, untuned       # ~256 MB of fresh 4 KiB pages
  assert tuned < untuned / 20, (tuned, untuned)


def test_the_switch_and_the_platform_decide(monkeypatch):
  monkeypatch.setenv(host_memory.ENV_SWITCH, "0")
  assert not host_memory.tune_malloc_for_xla_cpu()
  monkeypatch.delenv(host_memory.ENV_SWITCH)
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert not host_memory.runs_on_cpu_only()
  assert not host_memory.tune_malloc_for_xla_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.runs_on_cpu_only()
