"""Compute kernels, each a Triton kernel beside the plain-torch reference that is both the CPU
path and the test oracle."""
