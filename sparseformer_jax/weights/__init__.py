"""Weight I/O: official PyTorch checkpoints and image-to-video inflation."""
