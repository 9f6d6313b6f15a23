"""Training: the loop, the optimizer and schedule, mixed precision, checkpoints."""
