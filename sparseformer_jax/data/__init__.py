"""Input pipeline: TFDS -> tf.data -> numpy batches (see input_pipeline.py)."""

from sparseformer_jax.data.input_pipeline import create_eval_iterator
from sparseformer_jax.data.input_pipeline import create_train_iterator
from sparseformer_jax.data.input_pipeline import DatasetNotFoundError
from sparseformer_jax.data.input_pipeline import get_dataset_info
from sparseformer_jax.data.input_pipeline import measure_throughput
