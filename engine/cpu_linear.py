"""Linear layers on the CPU through oneDNN, with each weight reordered once into oneDNN's blocked
layout at load time.

torch's default CPU GEMM re-reads the plain row-major weight on every call; for the small row
counts of serving (1-1024 tokens a step) oneDNN's packed kernels measured 2-4x faster on x86 at
the same float32 accuracy (docs/benchmarks.md). The ops are torch's own (what inductor's CPU
weight prepacking calls); when they are missing or fail a self-check, layers stay as they are.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose weight lives in oneDNN's layout; inputs and outputs are plain tensors."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        has_bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}"


@cache
def onednn_linear_available(dtype: torch.dtype) -> bool:
    """Whether packed linears run here and agree with F.linear (checked once per dtype)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():  # the caller's RNG stays as it was
            torch.manual_seed(0)
            ref = nn.Linear(64, 48).to(dtype)
            x = torch.randn(5, 64, dtype=dtype)
            out = PackedLinear(ref)(x)
            expected = ref(x)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return out.shape == expected.shape and torch.allclose(out, expected, atol=tol, rtol=tol)
    except (RuntimeError, AttributeError):
        return False


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of a CPU model by a PackedLinear; returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not targets or not onednn_linear_available(targets[0][1].weight.dtype):
        return 0
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, PackedLinear(linear))
    return len(targets)
