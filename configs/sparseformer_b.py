"""SparseFormer-B (sparseformer_v1_base) on ImageNet-1K, the official recipe (docs/recipe.md).

Expected: top-1 82.6 (ema_val/top1 / val/top1 at epoch 300, 224 px).

Cloud TPU VM pod slice (runs on every host; data prepared once into a bucket):
  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd sparseformer-jax && \
    python main.py --config=configs/sparseformer_b.py --workdir=gs://$BUCKET/sf_b \
    --config.data_dir=gs://$BUCKET/tensorflow_datasets"
GPU machine (8 GPUs, bfloat16 compute):
  python main.py --config=configs/sparseformer_b.py --workdir=workdirs/sf_b --config.dtype=bfloat16
Smoke run (tiny model, seconds on a CPU):
  python main.py --config=configs/sparseformer_b.py:smoke --workdir=/tmp/sf_b_smoke
Running the same command again resumes from the workdir's latest checkpoint.
"""
from configs import common


def get_config(arg: str = ''):
  return common.imagenet_config('sparseformer_v1_base', drop_path_rate=0.4, arg=arg)
