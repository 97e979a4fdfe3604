"""The malloc setting that keeps XLA:CPU's per-call temporaries mapped between calls (its effect
on a whole training step is measured by scripts/benchmark.py)."""
import os
import subprocess
import sys

import pytest

from sparseformer_jax import host_memory

# In a worker thread, as XLA:CPU allocates: malloc, touch and free 256 MB twice, then print the
# minor page faults of a third round. Untuned, glibc serves each round a fresh mmap.
_PROGRAM = """
import ctypes, ctypes.util, resource, sys, threading
from sparseformer_jax import host_memory
print(host_memory.tune_malloc_for_xla_cpu(), file=sys.stderr)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 << 20
def round_trip():
  block = libc.malloc(SIZE)
  ctypes.memset(block, 1, SIZE)
  libc.free(block)
faults = []
def work():
  round_trip(); round_trip()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  round_trip()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start(); thread.join()
print(faults[0])
"""


def _faults_of_a_round(switch: str) -> int:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{host_memory.ENV_SWITCH: switch})
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True,
                       check=True)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_tuned_malloc_reuses_a_freed_block_in_a_worker_thread():
  untuned, tuned = _faults_of_a_round("0"), _faults_of_a_round("1")
  assert untuned > 50_000, untuned       # 256 MB of fresh 4 KiB pages
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
