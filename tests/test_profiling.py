"""sparseformer_jax/analysis/profiling.py: op names -> layers, and a real profile through the benchmark."""
import os
import sys

import pytest

from sparseformer_jax.analysis import profiling

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
import benchmark  # pylint: disable=wrong-import-position
from test_benchmark import TINY_SF, overrides  # pylint: disable=wrong-import-position


@pytest.mark.parametrize("op_name, depth, expected", [
    ("jit(train_step)/transpose(jvp(SparseFormer))/cortex/unit_1/mlp/fc2/dot_general", 3,
     ("backward", "SparseFormer/cortex/unit_1")),
    ("jit(train_step)/jvp(SparseFormer)/focusing/mixing/fc2/add", 2,
     ("forward", "SparseFormer/focusing")),
    ("jit(train_step)/jvp(SparseFormer)/focusing/jit(_where)/select_n", 5,
     ("forward", "SparseFormer/focusing")),                  # jnp helpers' jits are not layers
    ("jit(_lambda)/SparseFormer/stem/conv/conv_general_dilated", 3,
     ("forward", "SparseFormer/stem/conv")),
    ("jit(train_step)/mul", 3, ("forward", profiling.OUTSIDE)),
])
def test_layer_of_op_names(op_name, depth, expected):
  assert profiling.layer_of(op_name, depth) == expected


def test_time_by_layer_sums_ops_per_layer_largest_first():
  hlo = """HloModule jit_step, entry_computation_layout={()->f32[]}
  %dot.1 = f32[4,4]{1,0} dot(%a, %b), metadata={op_name="jit(step)/jvp(M)/mlp/fc1/dot_general"}
  %fusion.2 = f32[4]{0} fusion(%c), kind=kLoop, metadata={op_name="jit(step)/jvp(M)/mlp/erf"}
  ROOT %dot.3 = f32[4,4]{1,0} dot(%d, %e), metadata={op_name="jit(step)/transpose(jvp(M))/mlp/fc1/transpose"}
  %copy.4 = f32[4,4]{0,1} copy(%dot.1)
"""
  names = profiling.op_names(hlo)
  assert names == {"dot.1": "jit(step)/jvp(M)/mlp/fc1/dot_general",
                   "fusion.2": "jit(step)/jvp(M)/mlp/erf",
                   "dot.3": "jit(step)/transpose(jvp(M))/mlp/fc1/transpose"}
  durations = {"dot.1": 1.0, "fusion.2": 0.5, "dot.3": 2.0, "copy.4": 0.25}
  assert list(profiling.time_by_layer(durations, names, depth=2).items()) == [
      (("backward", "M/mlp"), 2.0), (("forward", "M/mlp"), 1.5), (("-", profiling.UNNAMED), 0.25)]
  table = profiling.format_table(profiling.time_by_layer(durations, names, depth=3))
  assert "M/mlp/fc1" in table and table.splitlines()[-1].split()[0] == "3750.0"


def test_benchmark_profiles_a_training_step_by_layer(capsys, tmp_path):
  result = benchmark.main(["--mode", "train", "--batch-size", "2", "--resolution", "32",
                           "--reps", "1", "--warmup", "0", "--profile", str(tmp_path),
                           *overrides("--override", TINY_SF)])
  printed = capsys.readouterr().out
  rows = {(direction, layer): seconds for direction, layer, seconds in result["profile"]}
  for direction in ("forward", "backward"):
    for layer in ("SparseFormer/stem/conv", "SparseFormer/focusing/mixing",
                  "SparseFormer/cortex/unit_0"):
      assert rows[direction, layer] > 0, (direction, layer)
  # The optimizer update is traced outside the model.
  assert rows["forward", profiling.OUTSIDE] > 0
  assert list(tmp_path.glob("plugins/profile/*/*.trace.json.gz"))
  table = printed.split("profile of one step")[1]
  assert "backward SparseFormer/cortex/unit_0" in table and "all ops" in table


def test_profile_refuses_a_sweep():
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--sweep", "32,64", "--profile", "/tmp/x"])
