"""Quality and size of each KV codec, for docs/benchmarks.md.

Perplexity of continuations whose prompt KV went through KVSender -> frames -> KVReceiver with each
codec (kv_transfer/quality.py), on the embedded model; compression against bfloat16 (scales
included) for the embedded model's cache and a Llama-3.1-8B-shaped one; and what the lossless
stages add on real KV.

    .venv/bin/python scripts/eval_kv_quality.py [--windows 16] [--prompt-len 512] [--continuation-len 128]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from engine.kv_cache import CacheConfig
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from kernels.kv_quant import CODECS
from kv_transfer import codecs
from kv_transfer.codecs import CodecSpec
from kv_transfer.layout import KVLayout
from kv_transfer.quality import REFERENCE_TOPICS, reference_text, transfer_perplexity


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--continuation-len", type=int, default=128)
    args = parser.parse_args()

    loaded = load_model("smollm2-135m", torch.float32, torch.device("cpu"))
    runner = ModelRunner(loaded.model, CacheConfig(memory_bytes=256 << 20), torch.device("cpu"))
    ids = loaded.tokenizer.encode(reference_text())
    print(f"# KV codec quality — {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}")
    print(f"text: Python Language Reference ({', '.join(REFERENCE_TOPICS)}), {len(ids)} tokens")
    print(f"windows: {args.windows} x (prompt {args.prompt_len} + continuation {args.continuation_len})\n")

    results = {}
    for name in CODECS:
        start = time.perf_counter()
        results[name] = transfer_perplexity(
            runner, ids, CodecSpec(name), args.prompt_len, args.continuation_len, args.windows
        )
        print(f"  {name}: {results[name].perplexity:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    base = results["none"].perplexity
    smol = KVLayout.of_cache(runner.config, runner.kv_cache)
    llama8b = KVLayout(32, 16, 8, 128, "bfloat16", "llama-3.1-8b")

    # Lossless stages on real KV: the first window's prompt blocks, as each codec encodes them.
    blocks = torch.arange(args.prompt_len // smol.block_size)
    lossless = {}
    for name in CODECS:
        spec = CodecSpec(name)
        raw = torch.empty(spec.raw_nbytes(smol, len(blocks), smol.num_layers), dtype=torch.uint8)
        codecs.encode(spec, runner.kv_cache, (0, smol.num_layers), blocks, raw)
        lossless[name] = {
            stage: raw.numel() / codecs.compress(CodecSpec(name, stage), raw).numel()
            for stage in ("zstd", "lz4")
        }

    print(
        "\n| codec | perplexity | vs none | x smaller than bf16, SmolLM2 (d=64) | Llama-3.1-8B (d=128) "
        "| + zstd | + lz4 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        spec = CodecSpec(name)
        print(
            f"| {name} | {r.perplexity:.4f} | {(r.perplexity / base - 1) * 100:+.2f}% "
            f"| {spec.compression_ratio(smol, 64, torch.bfloat16):.2f} "
            f"| {spec.compression_ratio(llama8b, 64, torch.bfloat16):.2f} "
            f"| {lossless[name]['zstd']:.2f}x | {lossless[name]['lz4']:.2f}x |"
        )
    print(f"\nscored tokens per codec: {results['none'].num_tokens}")
    print("(sizes against the same KV in bfloat16, so `none` of this float32 cache is 0.5x; + zstd / + lz4:")
    print("further shrinkage of each codec's payload of this KV)")


if __name__ == "__main__":
    main()
