"""Throughput of a SparseFormer (or the dense ViT baseline): inference or one AdamW training step.

  python scripts/benchmark.py --model sparseformer_v1_tiny --mode infer --batch-size 32
  python scripts/benchmark.py --model sparseformer_v1_tiny --mode train --batch-size 32
  python scripts/benchmark.py --model sparseformer_v1_tiny --mode train --sub-batches 4   # CPU
  python scripts/benchmark.py --mode train --no-cpu-workarounds   # the plain ops on the CPU too
  python scripts/benchmark.py --model sparseformer_v1_tiny --sweep 224,448,896 \
      --baseline vit_s16 --batch-size 8 --plot sweep.png
  taskset -c 0 python scripts/benchmark.py --mode train --profile /tmp/prof   # CPU work by layer

Compilation and `--warmup` calls are excluded; each of `--reps` repetitions times `--steps`
calls, and the median repetition gives img/s. FLOPs are XLA's count for the compiled program
(2 per multiply-add) divided by the batch. Peak memory is the device's own figure where the
backend reports one (GPU/TPU), else null; `xla_memory_bytes` is the compiled program's
arguments + outputs + temporaries. On a shared machine, `step_cpu_seconds` (the process's CPU
time per step, all threads) varies less than wall time. On the CPU, malloc is tuned first as
main.py does, and the steps get main.py's compiler options (sparseformer_jax/ops/xla_cpu.py;
"malloc_tuned" and "compiler_options" in the JSON).

Shared machines have slow windows (other tenants on the same cores): the same step can measure
30% slower for an hour. `reference_matmul_gflops` is the backend's float32 rate on a square matmul
(`--reference-size`) timed just before and just after the repetitions, so that figures from
different windows can be told apart (these 2 CPU cores: ~400 GFLOP/s at their best).

`--profile DIR` runs one more step under jax.profiler (a trace for TensorBoard or Perfetto in DIR)
and prints its XLA op time by model layer, forward and backward (sparseformer_jax/analysis/profiling.py).

The last line printed is one JSON object: the figures, and for a sweep the same for every
(model, resolution) under "sweep", the top level repeating the first row.
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from sparseformer_jax import create_model, ops
from sparseformer_jax.analysis import profiling
from sparseformer_jax.ops import xla_cpu
from sparseformer_jax.models.config import parse_overrides
from sparseformer_jax.models.stem import KERNEL
from sparseformer_jax.baselines.vit import VIT_VARIANTS, create_vit
from sparseformer_jax.ops.sub_batches import apply_in_sub_batches


def parse_resolution(text: str):
  """'224' -> (224, 224); '224x320' -> (224, 320) as (H, W)."""
  parts = [int(p) for p in text.lower().split("x")]
  if len(parts) == 1:
    parts *= 2
  if len(parts) != 2 or min(parts) < 1:
    raise argparse.ArgumentTypeError(f"resolution {text!r}: expected H or HxW, e.g. 224x320")
  return tuple(parts)


def build_model(name: str, dtype: str, overrides: dict):
  """A SparseFormer variant or a ViT baseline (`vit_*`) by name."""
  if name in VIT_VARIANTS:
    return create_vit(name, dtype=dtype, **overrides)
  return create_model(name, dtype=dtype, **overrides)


def _init_params(model, key, image):
  """The model's initial params. The init runs once, untimed: compiling it without LLVM
  optimizations halves its compile time."""
  init = jax.jit(model.init).lower(key, image).compile({"xla_backend_optimization_level": 0})
  return init(key, image)["params"]


def make_step(model, mode: str, images, key, sub_batches: int = 1):
  """(jitted step function, its initial arguments); the step's outputs feed its next call.

  infer: (params, images) -> logits. train: one AdamW update on a softmax cross-entropy with
  drop path on: (state, images, labels) -> (state, loss), the state donated. Both run the batch
  as `sub_batches` interleaved sub-batches, as main.py's config.sub_batches does, and both are
  compiled with main.py's options (`xla_cpu.compiler_options`).
  """
  options = xla_cpu.compiler_options()
  params = _init_params(model, key, images[:1])
  if mode == "infer":
    infer = lambda p, x: apply_in_sub_batches(
        lambda sub, _: model.apply({"params": p}, sub), x, sub_batches)
    return jax.jit(infer, compiler_options=options), (params, images)
  tx = optax.adamw(1e-4, weight_decay=0.05)
  labels = jnp.zeros(images.shape[0], jnp.int32)

  def train_step(state, x, y):
    params, opt_state, step = state

    def loss_fn(p):
      logits = apply_in_sub_batches(
          lambda sub, k: model.apply({"params": p}, sub, train=True, rngs={"dropout": k}),
          x, sub_batches, jax.random.fold_in(key, step))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, step + 1), loss
  state = (params, tx.init(params), jnp.zeros((), jnp.int32))
  return jax.jit(train_step, donate_argnums=0, compiler_options=options), (state, images, labels)


def _cost(compiled, key: str):
  """One entry of XLA's cost analysis (a dict, or a list of dicts in older jax), or None."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return (cost or {}).get(key)


def _xla_memory_bytes(compiled):
  """Arguments + outputs + temporaries of the compiled program (bytes), or None."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _peak_device_memory():
  """The device's peak bytes in use, where the backend reports it (GPU/TPU); None on CPU."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _call(fn, args, mode):
  """Runs one step and threads the train state through; returns the next arguments."""
  out = fn(*args)
  jax.block_until_ready(out)
  return (out[0], *args[1:]) if mode == "train" else args


def reference_matmul_gflops(size: int, reps: int = 5) -> float:
  """The backend's float32 matmul rate on (size, size) @ (size, size): the median of `reps`
  timed calls after one untimed, in GFLOP/s (2 size**3 FLOPs a call)."""
  a = jnp.ones((size, size), jnp.float32)
  product = jax.jit(lambda a: a @ a)
  product(a).block_until_ready()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    product(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / statistics.median(times) / 1e9


def measure(model_name: str, mode: str, batch_size: int, resolution, dtype: str = "float32",
            reps: int = 5, steps: int = 1, warmup: int = 3, overrides=None, seed: int = 0,
            sub_batches: int = 1, profile_dir: str = "", profile_depth: int = 3,
            reference_size: int = 2048, cpu_workarounds: bool = True) -> dict:
  """Compiles and times one configuration; returns the figures as a dict (img/s None if reps=0).
  With `profile_dir`, one more step is profiled: "profile" lists [pass, layer, op seconds].
  With `reference_size` > 0 the reference matmul is timed before and after the repetitions.
  `cpu_workarounds=False` traces the plain ops on the CPU too (sparseformer_jax/ops)."""
  model = build_model(model_name, dtype, overrides or {})
  key = jax.random.key(seed)
  images = jax.random.normal(key, (batch_size, *resolution, 3), jnp.float32)
  fn, args = make_step(model, mode, images, key, sub_batches)
  start = time.perf_counter()
  with ops.cpu_workarounds(cpu_workarounds):
    compiled = fn.lower(*args).compile()
    workarounds_used = ops.use_cpu_workarounds()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    args = _call(compiled, args, mode)
  reference = [reference_matmul_gflops(reference_size)] if reference_size else []
  wall, cpu = [], []
  for _ in range(reps):
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
      args = _call(compiled, args, mode)
    wall.append((time.perf_counter() - start) / steps)
    cpu.append((time.process_time() - start_cpu) / steps)
  if reference_size:
    reference.append(reference_matmul_gflops(reference_size))
  layers = (profiling.profile_call(compiled, lambda: _call(compiled, args, mode), profile_dir,
                                    profile_depth) if profile_dir else {})
  flops = _cost(compiled, "flops")
  return {
      "model": model_name, "mode": mode, "batch_size": batch_size, "sub_batches": sub_batches,
      "resolution": list(resolution), "dtype": dtype, "backend": jax.default_backend(),
      "img_per_sec": batch_size / statistics.median(wall) if wall else None,
      "gflops_per_image": flops / batch_size / 1e9 if flops else None,
      "compile_seconds": compile_s,
      "compiler_options": xla_cpu.compiler_options(),
      "cpu_workarounds": workarounds_used,
      "peak_memory_bytes": _peak_device_memory(),
      "xla_memory_bytes": _xla_memory_bytes(compiled),
      "step_seconds": wall,
      "step_cpu_seconds": cpu,
      "reference_matmul_gflops": reference or None,
      "profile": [[direction, layer, t] for (direction, layer), t in layers.items()] or None,
  }


def _format_row(row: dict) -> str:
  img_s = f"{row['img_per_sec']:9.1f}" if row["img_per_sec"] else "        -"
  gflops = f"{row['gflops_per_image']:10.2f}" if row["gflops_per_image"] else "         -"
  memory = row["peak_memory_bytes"] or row["xla_memory_bytes"]
  memory = f"{memory / 2**20:10.0f}" if memory else "         -"
  reference = row["reference_matmul_gflops"]
  reference = "/".join(f"{r:.0f}" for r in reference) if reference else "-"
  return (f"{row['model']:24s} {'x'.join(map(str, row['resolution'])):>9s} {gflops} {img_s} "
          f"{row['compile_seconds']:9.1f} {memory} {reference:>15s}")


TABLE_HEADER = (f"{'model':24s} {'HxW':>9s} {'GFLOP/img':>10s} {'img/s':>9s} {'compile s':>9s} "
                f"{'mem MiB':>10s} {'matmul GFLOP/s':>15s}")


def plot_sweep(rows, path: str) -> None:
  """Saves GFLOP/image and img/s against resolution, one line per model, as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name in dict.fromkeys(r["model"] for r in rows):
    mine = [r for r in rows if r["model"] == name]
    side = [r["resolution"][0] for r in mine]
    axes[0].plot(side, [r["gflops_per_image"] for r in mine], "o-", label=name)
    timed = [(s, r["img_per_sec"]) for s, r in zip(side, mine) if r["img_per_sec"]]
    if timed:
      axes[1].plot(*zip(*timed), "o-", label=name)
  axes[0].set(xlabel="image side (px)", ylabel="GFLOP / image (XLA)", xscale="log",
              yscale="log", title="cost")
  axes[1].set(xlabel="image side (px)", ylabel="images / s", xscale="log", yscale="log",
              title=f"{rows[0]['mode']}, batch {rows[0]['batch_size']}, {rows[0]['dtype']}, "
                    f"{rows[0]['backend']}")
  for ax in axes:
    ax.set_xticks(sorted({r["resolution"][0] for r in rows}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
      ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _at_least(minimum: int):
  """An argparse type: an int >= minimum, else one line saying so."""
  def parse(text):
    value = int(text)  # not an int: argparse's "invalid int value"
    if value < minimum:
      raise argparse.ArgumentTypeError(f"{value} is too small: use {minimum} or more")
    return value
  parse.__name__ = "int"
  return parse


def _check_models(parser, args) -> None:
  """Model names, overrides and sizes, before anything is built or compiled (parser.error)."""
  models = [(args.model, args.override)]
  if args.sweep and args.baseline:
    models.append((args.baseline, args.baseline_override))
  try:
    for name, overrides in models:
      build_model(name, args.dtype, parse_overrides(overrides))
  except (ValueError, TypeError) as e:
    parser.error(" ".join(str(e).split()))
  try:
    sides = [int(s) for s in args.sweep.split(",")] if args.sweep else list(args.resolution)
  except ValueError:
    parser.error(f"--sweep {args.sweep!r}: expected comma-separated sides, e.g. 224,448,896")
  if args.model not in VIT_VARIANTS and min(sides) < KERNEL:
    parser.error(f"resolution {min(sides)} is below the stem's {KERNEL}x{KERNEL} convolution: "
                 f"use at least {KERNEL}")
  if args.batch_size % args.sub_batches:
    parser.error(f"--batch-size {args.batch_size} does not split into --sub-batches "
                 f"{args.sub_batches}: use a multiple of it")


def parse_args(argv):
  parser = argparse.ArgumentParser(prog=os.path.basename(__file__),
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="sparseformer_v1_tiny",
                      help="a SparseFormer variant or a ViT baseline: " + ", ".join(VIT_VARIANTS))
  parser.add_argument("--mode", choices=("infer", "train"), default="infer")
  parser.add_argument("--batch-size", type=_at_least(1), default=32)
  parser.add_argument("--sub-batches", type=_at_least(1), default=1,
                      help="run each batch as this many interleaved sub-batches in one program "
                           "(config.sub_batches): faster on CPU, e.g. 4; 1 on GPU/TPU")
  parser.add_argument("--cpu-workarounds", action=argparse.BooleanOptionalAction, default=True,
                      help="on the CPU, the ops' XLA:CPU versions (config.cpu_workarounds); "
                           "--no-cpu-workarounds: the plain ops that GPU/TPU run (A/B runs)")
  parser.add_argument("--resolution", type=parse_resolution, default=(224, 224),
                      help="H or HxW in pixels")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype (params stay float32)")
  parser.add_argument("--reps", type=_at_least(0), default=5,
                      help="timed repetitions (0: compile only)")
  parser.add_argument("--steps", type=_at_least(1), default=1, help="calls per repetition")
  parser.add_argument("--warmup", type=_at_least(0), default=3,
                      help="untimed calls after compiling (the heap reaches its size in a few)")
  parser.add_argument("--reference-size", type=_at_least(0), default=2048,
                      help="side of the float32 matmul timed before and after the repetitions, "
                           "to tell a slow window of a shared machine (0: skip)")
  parser.add_argument("--override", action="append", default=[],
                      help="model config field=value (repeatable), e.g. --override num_tokens=16")
  parser.add_argument("--sweep", default="",
                      help="comma-separated square resolutions, e.g. 224,448,896: prints a table "
                           "for --model and --baseline")
  parser.add_argument("--baseline", default="vit_s16",
                      help="dense model swept beside --model ('' for none)")
  parser.add_argument("--baseline-override", action="append", default=[],
                      help="config field=value of the baseline (repeatable)")
  parser.add_argument("--plot", default="", help="sweep: save the plot to this PNG")
  parser.add_argument("--profile", default="",
                      help="profile one more step into this folder and print op time by layer")
  parser.add_argument("--profile-depth", type=_at_least(1), default=3,
                      help="layer path components the profile groups by, e.g. 3: "
                           "SparseFormer/cortex/unit_1")
  args = parser.parse_args(argv)
  if args.profile and args.sweep:
    parser.error("--profile profiles one configuration: drop --sweep, or profile each "
                 "--resolution in its own run.")
  _check_models(parser, args)
  return args


def main(argv=None) -> dict:
  """Runs the benchmark (or the sweep), prints a table, then one JSON line; returns that dict."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  malloc_tuned = xla_cpu.tune_malloc_for_xla_cpu()   # as main.py does
  common = dict(mode=args.mode, batch_size=args.batch_size, dtype=args.dtype, reps=args.reps,
                steps=args.steps, warmup=args.warmup, sub_batches=args.sub_batches,
                reference_size=args.reference_size, cpu_workarounds=args.cpu_workarounds)
  if not args.sweep:
    result = measure(args.model, resolution=args.resolution,
                     overrides=parse_overrides(args.override), profile_dir=args.profile,
                     profile_depth=args.profile_depth, **common)
    print(TABLE_HEADER + "\n" + _format_row(result), flush=True)
    if args.profile:
      layers = {(direction, layer): t for direction, layer, t in result["profile"]}
      print(f"\nprofile of one step (trace in {args.profile}):\n"
            + profiling.format_table(layers), flush=True)
  else:
    models = [(args.model, parse_overrides(args.override))]
    if args.baseline:
      models.append((args.baseline, parse_overrides(args.baseline_override)))
    print(TABLE_HEADER, flush=True)
    rows = []
    for name, overrides in models:
      for side in (int(s) for s in args.sweep.split(",")):
        rows.append(measure(name, resolution=(side, side), overrides=overrides, **common))
        print(_format_row(rows[-1]), flush=True)
    if args.plot:
      plot_sweep(rows, args.plot)
      print(f"plot: {args.plot}", flush=True)
    result = {**rows[0], "sweep": rows, "plot": args.plot or None}
  result["malloc_tuned"] = malloc_tuned
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
