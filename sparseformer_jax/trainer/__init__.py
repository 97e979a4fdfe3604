"""The trainer: train/eval loop, checkpoints, sharding, optimizer, metrics, preemption, config schema."""
