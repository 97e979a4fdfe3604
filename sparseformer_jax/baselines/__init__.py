"""Dense baselines to compare SparseFormer against (ViT)."""
