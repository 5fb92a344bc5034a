"""Time one linear layer through torch's default GEMM and through oneDNN with a packed weight.

.venv/bin/python scripts/bench_linear.py [--in-features 576] [--out-features 3072]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from engine.cpu_linear import PackedLinear, onednn_linear_available


def median_us(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    layer(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-features", type=int, default=576)
    parser.add_argument("--out-features", type=int, default=3072)
    parser.add_argument("--rows", default="1,8,32,128,1024", help="comma-separated token counts")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not onednn_linear_available(torch.float32):
        raise SystemExit("oneDNN packed linears are not available in this torch build")
    torch.manual_seed(0)
    linear = nn.Linear(args.in_features, args.out_features, bias=False)
    packed = PackedLinear(linear)
    print("| rows | torch linear (us) | oneDNN packed (us) | speed-up | max abs diff |")
    print("|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, args.in_features)
            plain = median_us(linear, x, args.repeats)
            fast = median_us(packed, x, args.repeats)
            diff = (linear(x) - packed(x)).abs().max().item()
            print(f"| {rows} | {plain:.0f} | {fast:.0f} | {plain / fast:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
