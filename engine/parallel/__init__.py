"""Parallel execution inside one engine instance (tensor parallelism, applied from outside the model)."""
