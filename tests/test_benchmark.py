"""scripts/benchmark.py on tiny models: its JSON line, train vs inference FLOPs, the sweep plot."""
import argparse
import json
import os
import statistics
import sys

import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
import benchmark  # pylint: disable=wrong-import-position

TINY_SF = ["conv_dim=8", "num_tokens=4", "num_points=4", "focusing_width=16", "cortex_width=32",
           "cortex_depth=1", "focusing_repeats=2", "num_heads=2", "num_classes=4"]
TINY_VIT = ["patch=8", "width=16", "depth=1", "num_heads=2", "num_classes=4"]


def run(capsys, *args) -> dict:
  """benchmark.main(args) -> the JSON object of its last printed line (checked against the dict
  main returns)."""
  returned = benchmark.main([*args, "--warmup", "0", "--reference-size", "64"])
  lines = capsys.readouterr().out.strip().splitlines()
  printed = json.loads(lines[-1])
  assert printed == json.loads(json.dumps(returned))
  return printed


def overrides(flag, items):
  return [arg for item in items for arg in (flag, item)]


def test_train_and_inference_report_throughput_and_xla_flops(capsys):
  common = ["--batch-size", "2", "--resolution", "32x48", "--reps", "2",
            *overrides("--override", TINY_SF)]
  infer = run(capsys, "--mode", "infer", *common)
  train = run(capsys, "--mode", "train", *common)
  for result in (infer, train):
    assert result["resolution"] == [32, 48] and result["batch_size"] == 2
    assert len(result["step_seconds"]) == 2 and len(result["step_cpu_seconds"]) == 2
    assert result["img_per_sec"] == pytest.approx(2 / statistics.median(result["step_seconds"]))
    assert result["compile_seconds"] > 0 and result["xla_memory_bytes"] > 0
    # The reference matmul, timed before and after the repetitions.
    assert len(result["reference_matmul_gflops"]) == 2
    assert min(result["reference_matmul_gflops"]) > 0
  # A training step is the forward pass, about twice that backward, and the optimizer.
  assert 2.0 < train["gflops_per_image"] / infer["gflops_per_image"] < 4.5


def test_no_cpu_workarounds_traces_the_plain_ops(capsys, monkeypatch):
  seen = []
  real = benchmark.ops.use_cpu_workarounds
  monkeypatch.setattr(benchmark.ops, "use_cpu_workarounds", lambda: seen.append(real()) or real())
  common = ["--batch-size", "1", "--resolution", "32", "--reps", "0",
            *overrides("--override", TINY_SF)]
  assert not run(capsys, "--no-cpu-workarounds", *common)["cpu_workarounds"]
  assert seen == [False]
  assert run(capsys, *common)["cpu_workarounds"] == (benchmark.jax.default_backend() == "cpu")


def test_sweep_prints_a_table_and_plots_cost_against_resolution(capsys, tmp_path):
  plot = tmp_path / "sweep.png"
  result = run(capsys, "--sweep", "32,64", "--batch-size", "1", "--reps", "1",
               "--baseline", "vit_s16", "--plot", str(plot), *overrides("--override", TINY_SF),
               *overrides("--baseline-override", TINY_VIT))
  rows = {(r["model"], r["resolution"][0]): r for r in result["sweep"]}
  assert sorted(rows) == [("sparseformer_v1_tiny", 32), ("sparseformer_v1_tiny", 64),
                          ("vit_s16", 32), ("vit_s16", 64)]
  growth = {name: rows[name, 64]["gflops_per_image"] / rows[name, 32]["gflops_per_image"]
            for name in ("sparseformer_v1_tiny", "vit_s16")}
  # Every patch is a ViT token (4x the tokens, and attention 16x); SparseFormer's latent tokens
  # stay, only its stem grows.
  assert growth["vit_s16"] > 3.5 and growth["sparseformer_v1_tiny"] < growth["vit_s16"]
  with Image.open(plot) as picture:
    assert picture.format == "PNG" and picture.size == (1000, 400)


def test_reference_matmul_rate_counts_two_flops_per_multiply_add(monkeypatch):
  clock = iter(range(100))   # every perf_counter() call advances one second
  monkeypatch.setattr(benchmark.time, "perf_counter", lambda: float(next(clock)))
  assert benchmark.reference_matmul_gflops(100, reps=3) == pytest.approx(2 * 100**3 / 1e9)


def test_reference_matmul_can_be_skipped(capsys):
  result = benchmark.main(["--batch-size", "1", "--resolution", "32", "--reps", "1", "--warmup",
                           "0", "--reference-size", "0", *overrides("--override", TINY_SF)])
  assert result["reference_matmul_gflops"] is None
  assert capsys.readouterr().out.splitlines()[1].rstrip().endswith("-")


def test_resolution_argument():
  assert benchmark.parse_resolution("224") == (224, 224)
  assert benchmark.parse_resolution("224x320") == (224, 320)
  with pytest.raises(argparse.ArgumentTypeError):
    benchmark.parse_resolution("0x3")


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_sub_batches_reach_the_step_and_keep_the_flops(capsys, monkeypatch, mode):
  seen = []
  real = benchmark.apply_in_sub_batches

  def spy(apply_fn, inputs, num, key=None):
    seen.append((inputs.shape[0], num))
    return real(apply_fn, inputs, num, key)
  monkeypatch.setattr(benchmark, "apply_in_sub_batches", spy)
  common = ["--mode", mode, "--batch-size", "4", "--resolution", "32", "--reps", "1",
            *overrides("--override", TINY_SF)]
  whole, split = run(capsys, *common), run(capsys, *common, "--sub-batches", "2")
  assert seen == [(4, 1), (4, 2)]   # the traced step ran the batch whole, then as 2 halves
  assert split["sub_batches"] == 2 and whole["sub_batches"] == 1
  assert split["gflops_per_image"] == pytest.approx(whole["gflops_per_image"], rel=0.02)


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "argument --batch-size: 0 is too small: use 1 or more"),
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["--sub-batches", "-2"], "argument --sub-batches: -2 is too small: use 1 or more"),
    (["--steps", "0"], "argument --steps: 0 is too small"),
    (["--reps", "-1"], "argument --reps: -1 is too small: use 0 or more"),
    (["--resolution", "0x32"], "resolution '0x32': expected H or HxW"),
    (["--resolution", "5"], "resolution 5 is below the stem's 7x7 convolution"),
    (["--batch-size", "6", "--sub-batches", "4"], "--batch-size 6 does not split into "
                                                  "--sub-batches 4"),
    (["--model", "sparseformer_v9"], "Unknown model 'sparseformer_v9'. Known models:"),
    (["--override", "num_tokns=4"], "Unknown model field(s) ['num_tokns']"),
    (["--override", "num_tokens"], "Model override 'num_tokens': expected field=value"),
    (["--sweep", "224,big"], "--sweep '224,big': expected comma-separated sides"),
    (["--sweep", "32", "--baseline-override", "widht=3"], "unexpected keyword argument 'widht'"),
    (["--mode", "fly"], "argument --mode: invalid choice: 'fly'"),
])
def test_bad_arguments_get_one_line_before_anything_is_built(capsys, args, message):
  with pytest.raises(SystemExit) as exit_:
    benchmark.parse_args(args)
  assert exit_.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert error.startswith("benchmark.py: error: ") and message in error, error
