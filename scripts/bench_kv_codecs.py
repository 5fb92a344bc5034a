"""Encode / decode throughput of the KV codecs on a Llama-3.1-8B-shaped cache, beside a plain copy.

.venv/bin/python scripts/bench_kv_codecs.py [--tokens 2048,8192] [--repeats 20]

GB/s counts the original KV bytes (cache dtype, all layers, K and V) per second. On a CUDA GPU it times
the Triton kernels (kernels/kv_quant_triton.py), the torch reference on the same GPU, and torch's
device-to-device copy of the same number of bytes, with CUDA events after a warmup. Without a GPU it
times only the torch reference on the CPU and a CPU memcpy, so the script still runs; those figures say
nothing about the kernels.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from kernels.kv_quant import CODECS, decode_ref, encode_ref, layer_nbytes

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # Llama-3.1-8B


def mean_ms(fn: Callable[[], None], repeats: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    if not cuda:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) * 1e3 / repeats
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens", default=None, help="comma-separated token counts (GPU: 2048,8192; CPU: 512)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (GPU: 20, CPU: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (GPU: 3, CPU: 1)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokens_list = [int(x) for x in (args.tokens or ("2048,8192" if cuda else "512")).split(",")]
    repeats = args.repeats or (20 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if cuda:
        print(f"# {torch.cuda.get_device_name(device)}, Triton kernels vs the torch reference on the GPU")
    else:
        print("# no CUDA GPU: timing the torch reference on the CPU only (the Triton kernels need a GPU)")
    print(f"# cache: {LAYERS} layers, {KV_HEADS} KV heads, head_dim {HEAD_DIM}, bfloat16, block {BLOCK_SIZE}")
    print()
    if cuda:
        print(
            "| tokens | codec | payload MiB | encode GB/s | decode GB/s | reference encode GB/s "
            "| reference decode GB/s | D2D copy GB/s | bytes as reference |"
        )
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    else:
        print(
            "| tokens | codec | payload MiB | reference encode GB/s (CPU) | reference decode GB/s (CPU) "
            "| memcpy GB/s (CPU) |"
        )
        print("|---:|---|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for tokens in tokens_list:
        for row in bench(tokens, device, repeats, warmup):
            print(row, flush=True)


def bench(tokens: int, device: torch.device, repeats: int, warmup: int) -> list[str]:
    """One markdown row per codec for a context of `tokens` tokens."""
    cuda = device.type == "cuda"
    n = -(-tokens // BLOCK_SIZE)
    num_blocks = 2 * n + 7
    cache = torch.randn(
        (LAYERS, 2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM), device=device, dtype=torch.bfloat16
    )
    dst_cache = torch.empty_like(cache)
    src_ids = torch.randperm(num_blocks, device=device)[:n]
    dst_ids = torch.randperm(num_blocks, device=device)[:n]
    layers = (0, LAYERS)
    kv_bytes = LAYERS * 2 * n * BLOCK_SIZE * KV_HEADS * HEAD_DIM * cache.element_size()
    flat = cache.view(-1)[: kv_bytes // cache.element_size()]
    copy_gbps = gbps(kv_bytes, mean_ms(partial(torch.empty_like(flat).copy_, flat), repeats, warmup, cuda))
    rows = []
    for codec in CODECS:
        size = LAYERS * layer_nbytes(codec, n, BLOCK_SIZE, KV_HEADS, HEAD_DIM, cache.element_size())
        ref_payload = torch.empty(size, dtype=torch.uint8, device=device)
        ref_enc = mean_ms(
            partial(encode_ref, cache, layers, src_ids, codec, ref_payload), repeats, warmup, cuda
        )
        ref_dec = mean_ms(
            partial(decode_ref, ref_payload, dst_cache, layers, dst_ids, codec), repeats, warmup, cuda
        )
        row = f"| {tokens} | {codec} | {size / 2**20:.1f} |"
        if cuda:
            from kernels.kv_quant_triton import decode_triton, encode_triton

            payload = torch.empty_like(ref_payload)
            enc = mean_ms(
                partial(encode_triton, cache, layers, src_ids, codec, payload), repeats, warmup, cuda
            )
            dec = mean_ms(
                partial(decode_triton, payload, dst_cache, layers, dst_ids, codec), repeats, warmup, cuda
            )
            same = (payload == ref_payload).double().mean().item() * 100
            row += f" {gbps(kv_bytes, enc)} | {gbps(kv_bytes, dec)} |"
            row += f" {gbps(kv_bytes, ref_enc)} | {gbps(kv_bytes, ref_dec)} | {copy_gbps} | {same:.3f}% |"
        else:
            row += f" {gbps(kv_bytes, ref_enc)} | {gbps(kv_bytes, ref_dec)} | {copy_gbps} |"
        rows.append(row)
    return rows


def gbps(nbytes: int, ms: float) -> str:
    return f"{nbytes / ms / 1e6:.3g}"


if __name__ == "__main__":
    main()
