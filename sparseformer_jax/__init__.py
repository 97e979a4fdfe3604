"""sparseformer-jax: SparseFormer (ICLR 2024) and its bootstrapped/video variants in JAX/Flax."""
from sparseformer_jax.models import (NORMALIZATION, VARIANTS, SparseFormer, SparseFormerConfig,
                                     create_model, get_config)
from sparseformer_jax.weights.inflate import inflate_from_image
from sparseformer_jax.analysis.intermediates import token_intermediates
from sparseformer_jax.weights.torch_checkpoint import load_torch_checkpoint, load_torch_model
from sparseformer_jax.weights.pretrained import PRETRAINED_URLS, load_pretrained

__all__ = [
    "NORMALIZATION", "PRETRAINED_URLS", "VARIANTS", "SparseFormer", "SparseFormerConfig",
    "create_model", "get_config", "inflate_from_image", "load_pretrained", "load_torch_checkpoint",
    "load_torch_model", "token_intermediates",
]
