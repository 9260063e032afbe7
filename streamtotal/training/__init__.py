"""Training: the loop, checkpoints, metrics and (in one module) distribution."""
