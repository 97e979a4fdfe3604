"""The GPU and TPU programs, checked without the hardware: the forward pass and the trainer's
jitted train step lowered for cuda and tpu (StableHLO) hold the plain ops only."""
import re

import jax
import jax.numpy as jnp
import pytest

from sparseformer_jax import create_model, ops
from sparseformer_jax.trainer import optim
from sparseformer_jax.trainer import sharding
from sparseformer_jax.trainer import train
from conftest import smoke_config

# A micro model with every part: a focusing unit and a sampling cortex unit, so two samplings.
MICRO = dict(conv_dim=8, num_tokens=4, num_points=4, focusing_width=16, focusing_repeats=1,
             cortex_width=32, cortex_depth=1, num_heads=2, num_classes=10)
IMAGES = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)


def lowered_texts(fn, args, platforms=("cuda", "tpu")):
  """fn's StableHLO for each platform, traced once with the plain ops, as a non-CPU backend
  traces it."""
  with ops.cpu_workarounds(False):
    traced = jax.jit(fn).trace(*args)
  return [traced.lower(lowering_platforms=(p,)).as_text() for p in platforms]


def forward(dtype):
  model = create_model("sparseformer_v1_tiny", dtype=dtype, **MICRO)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  return lambda v, x: model.apply(v, x), (variables, IMAGES)


def train_step(dtype):
  config = smoke_config()
  config.input.image_size, config.dtype = 32, dtype
  model = create_model("sparseformer_v1_tiny", dtype=dtype, **MICRO)
  schedule = optim.learning_rate_schedule(config.optimizer, global_batch_size=4,
                                          total_steps=10, warmup_steps=2)
  tx = optim.create_optimizer(config.optimizer, schedule)
  state = jax.eval_shape(train.make_init_fn(model, tx, config))
  batch = {"image": IMAGES, "label": jax.ShapeDtypeStruct((4, 10), jnp.float32)}
  step = train.make_train_step(model, tx, schedule, config, sharding.create_mesh(config.mesh))
  return step, (state, batch)


def op_lines(text: str, op: str):
  return [line for line in text.splitlines() if f"stablehlo.{op}" in line]


def operand_types(line: str):
  """The element types of an op's operands, from its trailing `: (types) -> type` signature."""
  signature = line.rsplit(" : ", 1)[-1]
  operands = signature.split("->")[0] if "->" in signature else signature
  return re.findall(r"tensor<[^>]*x(\w+)>", operands)


@pytest.mark.parametrize("program", ["forward", "train_step"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accelerator_programs_hold_the_plain_ops(program, dtype):
  fn, args = (forward if program == "forward" else train_step)(dtype)
  for text in lowered_texts(fn, args):
    check_plain_ops(text, program, dtype)


def check_plain_ops(text: str, program: str, dtype: str):
  # No CPU workaround: no optimization barrier, no conditional.
  assert "optimization_barrier" not in text
  assert not op_lines(text, "case") and not op_lines(text, "if")
  # The stem is one 2-D convolution (with its kernel gradient in training), NHWC.
  convs = op_lines(text, "convolution")
  assert len(convs) == (1 if program == "forward" else 2)
  specs = [re.search(r"dim_numbers = (\[.*?\]x\[.*?\]->\[.*?\])", c).group(1) for c in convs]
  assert all(part.count("0") == part.count("1") == 1 and "2" not in part
             for spec in specs for part in re.split("x|->", spec)), specs     # 2 spatial axes
  assert "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]" in convs[0]
  # Sampling is a gather of the points' neighbours' feature vectors (conv_dim 8 each).
  assert [g for g in op_lines(text, "gather") if "slice_sizes = array<i64: 1, 1, 8>" in g]
  # Plain max-pool: a reduce-window (its gradient a select-and-scatter).
  assert op_lines(text, "reduce_window")
  if dtype == "bfloat16":
    dots = op_lines(text, "dot_general") + convs
    assert len(dots) >= (10 if program == "forward" else 30)
    assert all(set(operand_types(d)) == {"bf16"} for d in dots), [
        d for d in dots if set(operand_types(d)) != {"bf16"}]
    # The sampling coordinates (floor) stay float32, and in the forward pass RoI adjust and the
    # softmax (every exp; in training GELU's gradient adds bfloat16 ones).
    for op in ("exponential", "floor") if program == "forward" else ("floor",):
      lines = op_lines(text, op)
      assert lines and all(operand_types(l) == ["f32"] for l in lines), (op, lines)


def test_the_cpu_trace_takes_the_workarounds_unless_switched_off():
  fn, args = forward("float32")
  grad = lambda: jax.grad(lambda v, x: fn(v, x).sum())   # a new function: jit caches traces
  cpu = jax.jit(grad()).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
  assert "optimization_barrier" in cpu and not op_lines(cpu, "reduce_window")
  assert "optimization_barrier" not in lowered_texts(grad(), args, ("cpu",))[0]
