"""SparseFormer models: `create_model(name, **overrides)` and the building blocks."""
from sparseformer_jax.models.config import NORMALIZATION, VARIANTS, SparseFormerConfig, get_config
from sparseformer_jax.models.sparseformer import SparseFormer


def create_model(name: str, **overrides) -> SparseFormer:
  """The named variant (see `VARIANTS`) as a flax.linen Module; kwargs override config fields.

  >>> model = create_model("sparseformer_v1_tiny", num_classes=10, dtype="bfloat16")
  >>> variables = model.init(jax.random.key(0), images)          # {'params': ...}
  >>> logits = model.apply(variables, images, train=False)
  """
  return SparseFormer(get_config(name, **overrides))
