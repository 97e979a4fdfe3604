"""Hardware-specific op variants and host settings (XLA:CPU), kept apart from the model."""
