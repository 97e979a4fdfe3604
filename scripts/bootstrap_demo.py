"""Bootstrapping end to end on the CPU: a ViT learns the embedded synthetic_objects with labels,
then a SparseFormer learns to match it WITHOUT labels (configs/bootstrap.py), and is scored with
the teacher's own classifier head.

  python scripts/bootstrap_demo.py --workdir workdirs/bootstrap_demo

Step 1 trains the teacher (configs/bootstrap.py:DEMO_TEACHER, a 6-block ViT with 8-pixel
patches) with the trainer's own train/eval steps and writes it as a vision_transformer .npz, the
format of the AugReg checkpoints; rerunning reuses it. Step 2 is exactly
  python main.py --workdir=WORKDIR/student \\
      --config=configs/bootstrap.py:teacher=WORKDIR/teacher.npz,dataset=synthetic_objects
and WORKDIR/summary.json gets both models' figures.
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
import jax

from configs import bootstrap as bootstrap_config
from configs import default as default_config
from sparseformer_jax import NORMALIZATION
from sparseformer_jax.baselines.vit import ViT, ViTConfig
from sparseformer_jax.data import input_pipeline
from sparseformer_jax.ops import xla_cpu
from sparseformer_jax.trainer import optim, sharding, train
from sparseformer_jax.weights.vit_checkpoint import to_vision_transformer_npz

STUDENT = 'sparseformer_btsp_augreg_base'


def teacher_config(epochs: float):
  """The embedded default recipe, with the student's input normalization (AugReg's 0.5/0.5)."""
  config = default_config.get_config()
  config.input.mean, config.input.std = NORMALIZATION[STUDENT]
  config.num_epochs = epochs
  config.optimizer.base_lr = 3e-4
  return config


def train_teacher(config, path: str) -> dict:
  """Trains the DEMO_TEACHER ViT with labels, writes it to `path`; returns its eval metrics."""
  info = input_pipeline.get_dataset_info(config)
  model = ViT(ViTConfig(num_classes=info['num_classes'], drop_path_rate=0.0,
                        **bootstrap_config.DEMO_TEACHER))
  steps = math.ceil(config.num_epochs * info['num_train_examples'] / config.global_batch_size)
  warmup = round(config.warmup_epochs * info['num_train_examples'] / config.global_batch_size)
  schedule = optim.learning_rate_schedule(config.optimizer,
                                          global_batch_size=config.global_batch_size,
                                          total_steps=steps, warmup_steps=warmup)
  tx = optim.create_optimizer(config.optimizer, schedule)
  mesh = sharding.create_mesh(config.mesh)
  options = xla_cpu.compiler_options()
  state = jax.jit(train.make_init_fn(model, tx, config))()
  step_fn = jax.jit(train.make_train_step(model, tx, schedule, config, mesh), donate_argnums=0,
                    compiler_options=options)
  batches = input_pipeline.create_train_iterator(
      config, local_batch_size=config.global_batch_size, process_index=0, process_count=1)
  start = time.monotonic()
  for step in range(1, steps + 1):
    state, metrics = step_fn(state, sharding.global_batch(next(batches), mesh))
    if step % config.log_every_steps == 0 or step == steps:
      print(f'teacher step {step}/{steps}: loss {float(metrics["train/loss"]):.4f}', flush=True)
  minutes = (time.monotonic() - start) / 60
  eval_step = jax.jit(train.make_eval_step(model, info['num_classes'], config.sub_batches),
                      compiler_options=options)
  results = train.evaluate(eval_step, state, config, mesh)
  to_vision_transformer_npz(state['params'], model.config, path)
  return {'teacher/val_top1': results['val/top1'], 'teacher/epochs': config.num_epochs,
          'teacher/steps': steps, 'teacher/train_minutes': round(minutes, 1)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/bootstrap_demo')
  parser.add_argument('--teacher-epochs', type=float, default=3.0)
  parser.add_argument('--student-epochs', type=float, default=2.0)
  args = parser.parse_args(argv)
  xla_cpu.tune_malloc_for_xla_cpu()
  os.makedirs(args.workdir, exist_ok=True)
  teacher_path = os.path.join(args.workdir, 'teacher.npz')
  teacher_json = os.path.join(args.workdir, 'teacher.json')
  if not os.path.exists(teacher_path):
    figures = train_teacher(teacher_config(args.teacher_epochs), teacher_path)
    with open(teacher_json + '.tmp', 'w') as f:
      json.dump(figures, f)
    os.replace(teacher_json + '.tmp', teacher_json)
  with open(teacher_json) as f:
    figures = json.load(f)

  config = bootstrap_config.get_config(f'teacher={teacher_path},dataset=synthetic_objects')
  config.num_epochs = args.student_epochs
  start = time.monotonic()
  results = train.train_and_evaluate(config, os.path.join(args.workdir, 'student'))
  figures.update({f'student/{k}': v for k, v in results.items()},
                 **{'student/epochs': args.student_epochs,
                    'student/train_minutes': round((time.monotonic() - start) / 60, 1)})
  with open(os.path.join(args.workdir, 'summary.json'), 'w') as f:
    json.dump(figures, f, indent=2)
  print(json.dumps(figures, indent=2))
  return figures


if __name__ == '__main__':
  main()
