"""XLA:CPU host settings: the malloc setting that keeps per-call temporaries mapped between calls,
and the compiler options of the jitted steps (their effect on whole steps is measured by
scripts/benchmark.py)."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import run_python

from sparseformer_jax.ops import xla_cpu

# In a worker thread, as XLA:CPU allocates: malloc, touch and free 256 MB twice, then print the
# minor page faults of a third round. Untuned, glibc serves each round a fresh mmap.
_PROGRAM = """
import ctypes, ctypes.util, resource, sys, threading
from sparseformer_jax.ops import xla_cpu
print(xla_cpu.tune_malloc_for_xla_cpu(), file=sys.stderr)
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
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{xla_cpu.ENV_SWITCH: switch})
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True,
                       check=True)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_tuned_malloc_reuses_a_freed_block_in_a_worker_thread():
  untuned, tuned = _faults_of_a_round("0"), _faults_of_a_round("1")
  assert untuned > 50_000, untuned       # 256 MB of fresh 4 KiB pages
  assert tuned < untuned / 20, (tuned, untuned)


def test_the_switch_and_the_platform_decide(monkeypatch):
  monkeypatch.setenv(xla_cpu.ENV_SWITCH, "0")
  assert not xla_cpu.tune_malloc_for_xla_cpu()
  monkeypatch.delenv(xla_cpu.ENV_SWITCH)
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert not xla_cpu.runs_on_cpu_only()
  assert not xla_cpu.tune_malloc_for_xla_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert xla_cpu.runs_on_cpu_only()


def _has_avx512() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      return " avx512f" in f.read()
  except OSError:
    return False


# Compiles the same elementwise function with and without the options, dumping XLA:CPU's LLVM IR.
_VECTORS_PROGRAM = """
import sys
import jax, jax.numpy as jnp
from sparseformer_jax.ops import xla_cpu
x = jnp.linspace(-3.0, 3.0, 1 << 16)
def tuned(x): return jnp.exp(x) * x + 1.0
def plain(x): return jnp.exp(x) * x + 1.0
jax.jit(tuned, compiler_options=xla_cpu.compiler_options())(x).block_until_ready()
jax.jit(plain)(x).block_until_ready()
"""


@pytest.mark.skipif(not _has_avx512(), reason="512-bit vectors need an AVX-512 CPU")
def test_compiler_options_make_kernels_use_512_bit_vectors(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_dump_to={tmp_path}")
  subprocess.run([sys.executable, "-c", _VECTORS_PROGRAM], env=env, check=True)

  def vector_ops(name, lanes):
    return sum(ll.read_text().count(f"<{lanes} x float>")
               for ll in tmp_path.glob(f"*jit_{name}*ir-with-opt.ll"))
  assert vector_ops("tuned", 16) > vector_ops("tuned", 8), "tuned kernel not 512-bit"
  assert vector_ops("plain", 8) > vector_ops("plain", 16), "XLA's default changed"


# main.py's trainer on the smoke config, recording the compiler options of every jax.jit.
_JIT_RECORDER = """
import sys
import jax
from conftest import smoke_config
from sparseformer_jax.trainer import train
real_jit, options = jax.jit, {}
def recording_jit(fun, **kwargs):
  options[getattr(fun, "__name__", "?")] = kwargs.get("compiler_options")
  return real_jit(fun, **kwargs)
jax.jit = recording_jit
train.train_and_evaluate(smoke_config(), sys.argv[1])
print(options)
"""


def test_the_trainer_compiles_its_steps_with_the_options(smoke_run, main_env, tmp_path):
  del smoke_run  # Ran first: its compiled programs are this run's (the compilation cache).
  printed = run_python(main_env, _JIT_RECORDER, str(tmp_path)).stdout.strip().splitlines()[-1]
  options = ast.literal_eval(printed)
  want = {"xla_cpu_prefer_vector_width": 512}
  assert options["train_step"] == want and options["eval_step"] == want, options
