"""The embedded datasets: generated locally by TFDS builders, nothing to download."""
