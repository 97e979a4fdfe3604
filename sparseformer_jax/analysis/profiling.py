"""Where a compiled step spends its time, by model layer: XLA op durations from a jax.profiler
trace, attributed to the layer each op was traced in (its `op_name` metadata) and split into the
forward and the backward pass.

Used by `scripts/benchmark.py --profile DIR`. An op's time is its duration on its thread, so ops
that XLA runs concurrently (on CPU, with several threads) overlap: the shares then describe the
work, not the wall time. Pinning the process to one core (`taskset -c 0`) makes the per-op
times add up to the step's CPU time.
"""
import collections
import glob
import gzip
import json
import os
import re

import jax

OUTSIDE = "(outside the model)"   # traced outside any module: the loss, the optimizer
UNNAMED = "(added by XLA)"         # no op_name: copies and transposes XLA inserted
_JIT = re.compile(r"jit\([^()]*\)/?")                      # jit(step)/, jit(_where) of jnp helpers
_WRAPPER = re.compile(r"\b(?:jvp|transpose|vmap|remat|checkpoint)\(")
_OP_NAME = re.compile(r'^\s*(?:ROOT )?%(\S+) = .*?\bop_name="([^"]*)"', re.MULTILINE)


def layer_of(op_name: str, depth: int):
  """('forward' | 'backward', layer path) of an HLO op from its `op_name` metadata, e.g.
  'jit(step)/transpose(jvp(SparseFormer))/cortex/unit_1/mlp/fc2/dot_general' at depth 3 ->
  ('backward', 'SparseFormer/cortex/unit_1'). The last component (the primitive) is dropped."""
  direction = "backward" if "transpose(" in op_name else "forward"
  path = _WRAPPER.sub("", _JIT.sub("", op_name)).replace(")", "")
  parts = [p for p in path.split("/") if p][:-1]
  return direction, "/".join(parts[:depth]) or OUTSIDE


def op_names(hlo_text: str) -> dict:
  """{HLO instruction name: op_name} of a compiled program's text (`compiled.as_text()`)."""
  return dict(_OP_NAME.findall(hlo_text))


def read_op_durations(trace_dir: str, module: str) -> collections.Counter:
  """{HLO instruction name: total seconds} of program `module` (e.g. 'jit_train_step') in the
  newest trace jax.profiler wrote under `trace_dir`."""
  traces = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")),
                  key=os.path.getmtime)
  if not traces:
    raise FileNotFoundError(f"No jax.profiler trace (*.trace.json.gz) under {trace_dir}.")
  with gzip.open(traces[-1]) as f:
    events = json.load(f)["traceEvents"]
  seconds = collections.Counter()
  for event in events:
    args = event.get("args", {})
    if event.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
      seconds[args["hlo_op"]] += event["dur"] * 1e-6          # trace durations are in us
  return seconds


def time_by_layer(durations: dict, names: dict, depth: int = 3) -> dict:
  """{(direction, layer): seconds} from per-op durations and their op_names, largest first."""
  totals = collections.Counter()
  for op, seconds in durations.items():
    key = layer_of(names[op], depth) if names.get(op) else ("-", UNNAMED)
    totals[key] += seconds
  return dict(totals.most_common())


def profile_call(compiled, call, trace_dir: str, depth: int = 3) -> dict:
  """Runs `call()` (one step of `compiled`, blocking) under the profiler into `trace_dir` and
  returns {(direction, layer): seconds} of its XLA ops."""
  with jax.profiler.trace(trace_dir):
    call()
  hlo = compiled.as_text()
  module = re.match(r"HloModule ([^,\s]+)", hlo).group(1)       # e.g. jit_train_step
  durations = read_op_durations(trace_dir, module)
  if not durations:
    raise RuntimeError(f"The trace under {trace_dir} has no ops of program {module}: this "
                       f"backend's profiler may not report XLA ops.")
  return time_by_layer(durations, op_names(hlo), depth)


def format_table(layers: dict, top: int = 25) -> str:
  """The `top` largest (direction, layer) rows with their share of all op time."""
  total = sum(layers.values()) or 1.0
  lines = [f"{'op ms':>9s} {'share':>6s}  {'pass':8s} layer"]
  for (direction, layer), seconds in list(layers.items())[:top]:
    lines.append(f"{seconds * 1e3:9.1f} {seconds / total:6.1%}  {direction:8s} {layer}")
  lines.append(f"{total * 1e3:9.1f} {1:6.0%}  all ops ({len(layers)} rows)")
  return "\n".join(lines)
