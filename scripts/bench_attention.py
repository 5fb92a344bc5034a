"""Time the Triton paged attention kernels (kernels/paged_attention_triton.py) on one CUDA GPU, beside
the torch paths and the GPU's own copy bandwidth measured in the same run.

    PYTHONPATH=. python3 scripts/bench_attention.py [--contexts 4096,8192] [--batches 1,64] [--splits auto,32]

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, block 16), block ids scattered
at random over the cache. Each case is checked against the torch reference first (atol 1.5e-2,
rtol 1e-2, bf16 queries), then timed two ways: eager, the median of --repeats calls each between its
own CUDA events after --warmup calls (launch overhead included); graph, the median replay of a CUDA
graph of --graph-calls calls divided by that count (GPU time only). Rates come from graph times.

- decode: the kernel alone over bf16, fp8 and int8 caches. GB/s counts the K and V bytes (and their
  float32 scales) read; "% of copy" divides it by the device-to-device copy bandwidth, which counts
  bytes read + written as ../shared/design/ANCHORS.md does. Calls cycle through disjoint block sets of
  --working-set-mib in all, as a model's layers would, so L2 does not hold the context between calls.
- prefill: packed variable-length chunks, paged_prefill_attention against torch SDPA per chunk
  (prefill_attention, gathering the context's blocks after a cached prefix). TFLOP/s counts 4 * H * D
  per visible (query, key) pair.

The tables go to stdout, progress to stderr, all numbers as JSON to --json and to
$OUT/bench_attention.json when OUT is set. Exits 1 when a case fails its check.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton

from kernels.paged_attention import (
    gather_blocks,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    prefill_attention,
    quantize_kv_rows,
)
from kernels.paged_attention_triton import num_splits, paged_decode_attention, paged_prefill_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # Llama-3.1-8B
SCALE = HEAD_DIM**-0.5
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
ATOL, RTOL = 1.5e-2, 1e-2  # bf16, as tests/kernels/test_paged_attention_triton.py
Call = Callable[[int], object]  # the i-th timed call


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--contexts", default="4096,8192", help="decode context lengths")
    p.add_argument("--batches", default="1,64", help="decode batch sizes")
    p.add_argument(
        "--cache-dtypes", default="bf16,fp8,int8", help=f"decode caches, of {', '.join(CACHE_DTYPES)}"
    )
    p.add_argument("--splits", default="auto", help="decode split counts; auto: the kernel's own choice")
    p.add_argument(
        "--chunks",
        default="2048,8x256,1024+8x64",
        help="prefill cases, each chunk lengths joined by +; NxL: N of L",
    )
    p.add_argument("--prefixes", default="0,1024", help="cached prefix before every chunk")
    p.add_argument("--repeats", type=int, default=100, help="eager timed calls")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before them")
    p.add_argument("--graph-calls", type=int, default=20, help="calls in one CUDA graph; 0: no graph")
    p.add_argument("--graph-repeats", type=int, default=10, help="timed replays of that graph")
    p.add_argument("--ref-repeats", type=int, default=10, help="timed calls of the decode reference")
    p.add_argument("--working-set-mib", type=int, default=512, help="decode K/V cycled through")
    p.add_argument("--copy-mib", type=int, default=1024, help="buffer of the copy measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    args.contexts, args.batches, args.prefixes = ints(args.contexts), ints(args.batches), ints(args.prefixes)
    args.cache_dtypes = args.cache_dtypes.split(",")
    if unknown := set(args.cache_dtypes) - set(CACHE_DTYPES):
        p.error(f"unknown cache dtypes {sorted(unknown)}; choose from {', '.join(CACHE_DTYPES)}")
    args.splits = [None if s == "auto" else int(s) for s in args.splits.split(",")]
    args.chunks = [parse_chunks(spec) for spec in args.chunks.split(",")]
    return args


def parse_chunks(spec: str) -> list[int]:
    """'1024+8x64' -> [1024, 64, 64, 64, 64, 64, 64, 64, 64]."""
    lens = []
    for part in spec.split("+"):
        count, _, length = part.rpartition("x")
        lens += [int(length)] * int(count or 1)
    return lens


def label(lens: list[int]) -> str:
    return "+".join(f"{len(list(run))}x{n}" for n, run in itertools.groupby(lens))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- timing -------------------------------------------------------------------------------------


def median_ms(fn: Call, repeats: int, warmup: int) -> float:
    """Median over `repeats` calls, each between its own pair of CUDA events."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    events = [[torch.cuda.Event(enable_timing=True) for _ in "se"] for _ in range(repeats)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(i)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def timed(fn: Call, args: argparse.Namespace) -> dict:
    """Eager ms per call, and ms per call in a CUDA graph of args.graph_calls calls (None: no graph)."""
    result = dict(eager_ms=median_ms(fn, args.repeats, args.warmup), graph_ms=None)
    if args.graph_calls > 0:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(args.graph_calls):
                    fn(i)
            result["graph_ms"] = median_ms(lambda _: graph.replay(), args.graph_repeats, 1) / args.graph_calls
        except RuntimeError as e:
            log(f"  CUDA graph capture failed, eager times only: {e}")
    return result


def best_ms(t: dict) -> float:
    return t["eager_ms"] if t["graph_ms"] is None else t["graph_ms"]


def copy_gbps(mib: int) -> float:
    """Device-to-device dst.copy_(src), counting bytes read + written."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_ms(lambda _: dst.copy_(src), 20, 3) / 1e6


# --- cases --------------------------------------------------------------------------------------


def random_cache(num_blocks: int, dtype: torch.dtype) -> list[torch.Tensor | None]:
    """K, V [num_blocks, BLOCK_SIZE, KVH, D] of `dtype`, then their scales (None unless quantized)."""
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    kv = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in "kv"]
    if dtype == torch.bfloat16:
        return [*kv, None, None]
    (kc, ks), (vc, vs) = (quantize_kv_rows(x.view(-1, KV_HEADS, HEAD_DIM), dtype) for x in kv)
    return [kc.view(shape), vc.view(shape), ks.view(shape[:3]), vs.view(shape[:3])]


def compact(cache: torch.Tensor | None, blocks: torch.Tensor) -> torch.Tensor | None:
    """The blocks [B, nb] of a cache (or its scales) back to back, moved as bytes (float8 cannot index)."""
    return None if cache is None else cache.view(torch.uint8)[blocks.flatten().long()].view(cache.dtype)


def check(got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = (got.float() - want.float()).abs()
    return dict(ok=bool((diff <= ATOL + RTOL * want.float().abs()).all()), max_abs_err=diff.max().item())


def bench_decode(batch: int, context: int, name: str, splits: int | None, args: argparse.Namespace) -> dict:
    dtype = CACHE_DTYPES[name]
    nb = -(-context // BLOCK_SIZE)
    read = 2 * batch * context * KV_HEADS * (HEAD_DIM * dtype.itemsize + 4 * (dtype != torch.bfloat16))
    sets = max(1, math.ceil((args.working_set_mib << 20) / read))
    cache = random_cache(sets * batch * nb, dtype)
    tables = torch.randperm(sets * batch * nb, device="cuda").int().view(sets, batch, nb)  # disjoint sets
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v, ks, vs = cache
    kernel = lambda i: paged_decode_attention(q, k, v, tables[i % sets], lens, SCALE, ks, vs, splits)  # noqa: E731
    # the reference over a compact copy of set 0, since it dequantizes the whole cache it is given
    small = [compact(c, tables[0]) for c in cache]
    small_tables = torch.arange(batch * nb, device="cuda", dtype=torch.int32).view(batch, nb)
    ref = lambda _: paged_decode_attention_ref(q, *small[:2], small_tables, lens, SCALE, *small[2:])  # noqa: E731
    result = dict(
        batch=batch, context=context, cache=name, bytes_read=read, sets=sets,
        splits=splits or num_splits(batch, KV_HEADS, nb * BLOCK_SIZE, q.device),
        check=check(kernel(0), ref(0)),
    )  # fmt: skip
    result.update(kernel=timed(kernel, args), ref_eager_ms=median_ms(ref, args.ref_repeats, 2))
    result["GBps"] = read / best_ms(result["kernel"]) / 1e6
    return result


def torch_prefill(
    q, k_new, v_new, k_cache, v_cache, tables, chunks: list[tuple[int, int, int]]
) -> torch.Tensor:
    """The torch path: SDPA per chunk over its own K/V, or over its gathered context after a prefix."""
    out = torch.empty_like(q)
    for c, (start, n, prefix) in enumerate(chunks):
        if prefix == 0:
            ks, vs = k_new[start : start + n], v_new[start : start + n]
        else:
            blocks = tables[c, : -(-(prefix + n) // BLOCK_SIZE)]
            ks, vs = (gather_blocks(x, blocks)[: prefix + n] for x in (k_cache, v_cache))
        out[start : start + n] = prefill_attention(q[start : start + n], ks, vs, SCALE, prefix)
    return out


def bench_prefill(lens: list[int], prefix: int, args: argparse.Namespace) -> dict:
    nbs = [-(-(prefix + n) // BLOCK_SIZE) for n in lens]
    perm = torch.randperm(sum(nbs), device="cuda").int().split(nbs)
    tables = torch.stack([torch.cat([ids, ids.new_zeros(max(nbs) - len(ids))]) for ids in perm])  # pad: 0
    k, v, _, _ = random_cache(sum(nbs), torch.bfloat16)
    starts = [sum(lens[:c]) for c in range(len(lens))]
    chunks = [(start, n, prefix) for start, n in zip(starts, lens, strict=True)]
    meta = [torch.tensor(x, device="cuda", dtype=torch.int32) for x in zip(*chunks, strict=True)]
    q = torch.randn(sum(lens), HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    # the chunks' own K/V as the model hands them (and as the kernel finds them, already stored)
    rows = list(zip(tables, nbs, lens, strict=True))
    k_new, v_new = (
        torch.cat([gather_blocks(x, t[:nb])[prefix : prefix + n] for t, nb, n in rows]) for x in (k, v)
    )
    paths = dict(
        triton=lambda _: paged_prefill_attention(q, k, v, tables, *meta, max(lens), SCALE),
        torch=lambda _: torch_prefill(q, k_new, v_new, k, v, tables, chunks),
    )
    want = paged_prefill_attention_ref(q, k, v, tables, *meta, SCALE)
    pairs = sum(n * prefix + n * (n + 1) // 2 for n in lens)  # visible (query, key) pairs
    result = dict(chunks=label(lens), prefix=prefix, tokens=sum(lens), flops=4 * HEADS * HEAD_DIM * pairs)
    for name, fn in paths.items():
        result[name] = dict(check=check(fn(0), want), **timed(fn, args))
        result[name]["TFLOPs"] = result["flops"] / best_ms(result[name]) / 1e9
    return result


# --- output -------------------------------------------------------------------------------------


def report(info: dict, decode: list[dict], prefill: list[dict], args: argparse.Namespace) -> str:
    checked = lambda c: f"{'ok' if c['ok'] else 'FAIL'} {c['max_abs_err']:.0e}"  # noqa: E731
    us = lambda ms: "-" if ms is None else f"{ms * 1e3:.1f}"  # noqa: E731
    ms = lambda ms: "-" if ms is None else f"{ms:.3f}"  # noqa: E731
    lines = [
        f"# {info['gpu']} on {info['machine']}, torch {info['torch']}, triton {info['triton']}, "
        f"CUDA {info['cuda']}, {info['date']}",
        f"# attention {HEADS} query heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}, block {BLOCK_SIZE}, "
        "scattered block ids; rates from graph times (eager where there is none)",
        f"# device copy ({args.copy_mib} MiB dst.copy_(src)): {info['copy_GBps_rw']:.0f} GB/s counting bytes "
        "read + written; decode GB/s counts the K+V (+scales) bytes read",
        "",
        "| batch | context | cache | splits | MiB read | us eager | us graph | GB/s | % of copy "
        "| reference us | check |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in decode:
        t = r["kernel"]
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['cache']} | {r['splits']} | {r['bytes_read'] / 2**20:.1f} "
            f"| {us(t['eager_ms'])} | {us(t['graph_ms'])} | {r['GBps']:.0f} "
            f"| {100 * r['GBps'] / info['copy_GBps_rw']:.0f}% | {us(r['ref_eager_ms'])} "
            f"| {checked(r['check'])} |"
        )
    lines += [
        "",
        "| chunks | prefix | tokens | Triton ms eager | graph | TFLOP/s | torch ms eager | graph | TFLOP/s "
        "| faster | check Triton, torch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in prefill:
        a, b = r["triton"], r["torch"]
        ta, tb = best_ms(a), best_ms(b)
        lines.append(
            f"| {r['chunks']} | {r['prefix']} | {r['tokens']} | {ms(a['eager_ms'])} | {ms(a['graph_ms'])} "
            f"| {a['TFLOPs']:.0f} | {ms(b['eager_ms'])} | {ms(b['graph_ms'])} | {b['TFLOPs']:.0f} "
            f"| {'Triton' if ta < tb else 'torch'} {max(ta, tb) / min(ta, tb):.2f}x "
            f"| {checked(a['check'])}, {checked(b['check'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py times the Triton kernels on a CUDA GPU; none is visible here")
    torch.manual_seed(args.seed)
    info = dict(
        machine=platform.node(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        args={k: v for k, v in vars(args).items() if k != "json"},
    )  # fmt: skip
    log("copy bandwidth")
    info["copy_GBps_rw"] = copy_gbps(args.copy_mib)
    decode, prefill = [], []
    cases = itertools.product(args.cache_dtypes, args.contexts, args.batches, args.splits)
    with torch.inference_mode():
        for name, context, batch, splits in cases:
            log(f"decode: batch {batch}, context {context}, {name} cache, splits {splits or 'auto'}")
            decode.append(bench_decode(batch, context, name, splits, args))
            torch.cuda.empty_cache()
        for lens, prefix in itertools.product(args.chunks, args.prefixes):
            log(f"prefill: {label(lens)}, prefix {prefix}")
            prefill.append(bench_prefill(lens, prefix, args))
            torch.cuda.empty_cache()
    print(report(info, decode, prefill, args))
    text = json.dumps({**info, "decode": decode, "prefill": prefill}, indent=1)
    paths = [args.json] if args.json else []
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / "bench_attention.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        log(f"wrote {path}")
    checks = [r["check"] for r in decode] + [r[p]["check"] for r in prefill for p in ("triton", "torch")]
    if failed := sum(not c["ok"] for c in checks):
        raise SystemExit(f"{failed} correctness check(s) failed (the 'check' columns above)")


if __name__ == "__main__":
    main()
