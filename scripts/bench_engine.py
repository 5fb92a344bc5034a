"""Prefill and decode throughput of pdserve's engine next to Hugging Face transformers, in one run.

    .venv/bin/python scripts/bench_engine.py                  # CPU: smollm2-135m, float32
    python scripts/bench_engine.py --batch-sizes 1,8,32       # GPU: dummy:llama-3.1-8b, bfloat16
    python scripts/bench_engine.py --batch-sizes 1,32,128 --input-len 1024 --output-len 64   # issue 6
    python scripts/bench_engine.py --batch-sizes 1 --input-len 2048 --output-len 2           # prefill

Both systems get the same random prompts of exactly --input-len token ids and decode greedily for
exactly --output-len tokens with no EOS stop. Per batch size B:

    prefill tok/s = B * input_len / time until every sequence has its first token (one step / forward)
    decode tok/s  = B * (output_len - 1) / time of the remaining steps
    ratio         = pdserve / HF  (> 1: pdserve is faster)

On a GPU it also measures the copy bandwidth in the same run and reports each decode rate against
its floor (one read of the weights and of every sequence's KV per step at that bandwidth) and the
prefill rate as TFLOP/s of weight FLOPs (2 x matmul parameters per token).

Both models stay loaded and the two systems take turns run by run; each figure is the median of
--repeats timed runs after --warmup untimed ones. The table goes to stdout, progress to stderr, all
numbers as JSON to --json and to $OUT/bench_engine.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.engine_config import DTYPES
from engine.errors import PDServeError
from engine.kv_cache import DEFAULT_BLOCK_SIZE
from engine.model_loader import DUMMY_PREFIX, EMBEDDED_MODEL, LoadedModel, embedded_model_path, load_model
from engine.presets import PRESETS

Prompts = list[list[int]]


@dataclass(frozen=True)
class Run:
    prefill_s: float
    decode_s: float
    tokens: Prompts  # [B][output_len] generated ids


@dataclass(frozen=True)
class Measurement:
    prefill_s: list[float]  # one per timed run
    decode_s: list[float]
    prefill_tok_s: float  # from the median time
    decode_tok_s: float


# --- options ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", help="pdserve model name or path (default: smollm2-135m on CPU, dummy:llama-3.1-8b on GPU)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="auto = bfloat16 on GPU, float32 on CPU"
    )
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default: 1,8,32)")
    p.add_argument("--input-len", type=int, help="prompt tokens (default: 128 on CPU, 512 on GPU)")
    p.add_argument("--output-len", type=int, help="generated tokens, >= 2 (default: 64 on CPU, 128 on GPU)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (default: 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default: 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--skip-hf", action="store_true", help="measure pdserve only")
    p.add_argument("--attention-backend", default="auto", help="auto | paged | grouped (default: auto)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode steps launched eagerly on a GPU")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = p.parse_args(argv)

    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes must hold positive integers")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device} was asked for but this machine has no CUDA GPU")
    on_gpu = device.type == "cuda"
    args.model = args.model or ("dummy:llama-3.1-8b" if on_gpu else EMBEDDED_MODEL)
    args.dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    args.input_len = args.input_len or (512 if on_gpu else 128)
    args.output_len = args.output_len or (128 if on_gpu else 64)
    for name, low in (("input_len", 1), ("output_len", 2), ("repeats", 1), ("warmup", 0), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    return args


# --- environment --------------------------------------------------------------------------------


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_prompts(batch: int, input_len: int, vocab_size: int, seed: int) -> Prompts:
    gen = torch.Generator().manual_seed(seed + batch)
    return torch.randint(100, vocab_size - 100, (batch, input_len), generator=gen).tolist()


# --- the two systems ----------------------------------------------------------------------------


def build_engine(args: argparse.Namespace, loaded: LoadedModel) -> LLMEngine:
    """One engine for all batch sizes: the largest batch prefills in one step and never preempts."""
    max_batch = max(args.batch_sizes)
    blocks_per_seq = -(-(args.input_len + args.output_len) // DEFAULT_BLOCK_SIZE)
    kv_bytes = loaded.config.kv_bytes_per_token(DTYPES[args.dtype].itemsize)
    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        kv_cache_memory=(max_batch * blocks_per_seq + 1) * DEFAULT_BLOCK_SIZE * kv_bytes,
        max_num_seqs=max_batch,
        max_num_batched_tokens=max_batch * args.input_len,
        attention_backend=args.attention_backend,
        cuda_graphs=not args.no_cuda_graphs,
    )
    return LLMEngine(config, loaded=loaded)


@torch.inference_mode()
def run_pdserve(engine: LLMEngine, prompts: Prompts, output_len: int, device: torch.device) -> Run:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    request_ids = [engine.add_request(p, params) for p in prompts]
    sync(device)
    start = time.perf_counter()
    outputs = {o.request_id: o for o in engine.step()}
    sync(device)
    prefilled = time.perf_counter()
    if len(outputs) != len(prompts) or any(len(o.token_ids) != 1 for o in outputs.values()):
        raise RuntimeError("pdserve did not prefill the batch in one step; raise max_num_batched_tokens")
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    sync(device)
    done = time.perf_counter()
    tokens = [list(outputs[r].token_ids) for r in request_ids]
    if any(len(t) != output_len for t in tokens):
        raise RuntimeError(f"pdserve returned {sorted({len(t) for t in tokens})} tokens, not {output_len}")
    return Run(prefilled - start, done - prefilled, tokens)


def load_hf(model: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The same model in transformers: the same GGUF/checkpoint, or random weights of the same preset."""
    import transformers

    if model.startswith(DUMMY_PREFIX):
        preset = PRESETS[model[len(DUMMY_PREFIX) :]]
        cls = getattr(transformers, preset["architectures"][0])
        with torch.device(device):
            net = cls._from_config(cls.config_class(**preset), dtype=dtype, attn_implementation="sdpa")
    else:
        path = embedded_model_path() if model.lower().startswith(EMBEDDED_MODEL) else Path(model).expanduser()
        where = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        source = str(path.parent) if where else str(path)
        net = transformers.AutoModelForCausalLM.from_pretrained(
            source, **where, dtype=dtype, attn_implementation="sdpa"
        ).to(device)
    return net.eval()


@torch.inference_mode()
def run_hf(model: torch.nn.Module, prompts: Prompts, output_len: int, device: torch.device) -> Run:
    """Greedy decoding by hand over the model's KV cache: a prefill forward, then one forward per token."""
    input_ids = torch.tensor(prompts, device=device)  # [B, input_len]
    sync(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    next_ids = out.logits[:, -1].argmax(dim=-1)  # [B]
    sync(device)
    prefilled = time.perf_counter()
    generated = [next_ids]
    for _ in range(output_len - 1):
        out = model(input_ids=next_ids[:, None], past_key_values=out.past_key_values, use_cache=True)
        next_ids = out.logits[:, -1].argmax(dim=-1)
        generated.append(next_ids)
    sync(device)
    done = time.perf_counter()
    return Run(prefilled - start, done - prefilled, torch.stack(generated, dim=1).tolist())


# --- measuring ----------------------------------------------------------------------------------

System = Callable[[Prompts], Run]


def load_systems(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, System], LoadedModel]:
    """Both systems, loaded side by side; returns them by name and pdserve's model."""
    log(f"loading {args.model} ({args.dtype}) for pdserve ...")
    loaded = load_model(args.model, DTYPES[args.dtype], device)
    engine = build_engine(args, loaded)
    needed = args.input_len + args.output_len
    if needed > engine.max_model_len:
        raise SystemExit(
            f"error: input-len + output-len = {needed} exceeds the context of {engine.max_model_len}"
        )
    vocab = loaded.config.vocab_size
    systems: dict[str, System] = {"pdserve": lambda p: run_pdserve(engine, p, args.output_len, device)}
    if not args.skip_hf:
        log(f"loading {args.model} ({args.dtype}) for transformers ...")
        model = load_hf(args.model, DTYPES[args.dtype], device)
        if model.config.vocab_size != vocab:
            raise SystemExit(
                f"error: transformers' vocab {model.config.vocab_size} differs from pdserve's {vocab}"
            )
        systems["HF"] = lambda p: run_hf(model, p, args.output_len, device)
    return systems, loaded


def measure(
    systems: dict[str, System], prompts: Prompts, args: argparse.Namespace
) -> dict[str, tuple[Measurement, Prompts]]:
    """The systems take turns run by run, so a drifting machine (clocks, neighbours) slows both alike."""
    batch = len(prompts)
    prefill_tokens, decode_tokens = batch * args.input_len, batch * (args.output_len - 1)
    runs: dict[str, list[Run]] = {name: [] for name in systems}
    for i in range(args.warmup + args.repeats):
        label = f"warm-up {i + 1}" if i < args.warmup else f"run {i + 1 - args.warmup}/{args.repeats}"
        for name, run in systems.items():
            r = run(prompts)
            log(
                f"[{name:>7}] batch {batch:>3} {label}: prefill {r.prefill_s:7.3f} s "
                f"({prefill_tokens / r.prefill_s:9.1f} tok/s), decode {r.decode_s:7.3f} s "
                f"({decode_tokens / r.decode_s:9.1f} tok/s)"
            )
            if i >= args.warmup:
                runs[name].append(r)
    results = {}
    for name, rs in runs.items():
        prefill_s, decode_s = [r.prefill_s for r in rs], [r.decode_s for r in rs]
        prefill_rate = prefill_tokens / statistics.median(prefill_s)
        decode_rate = decode_tokens / statistics.median(decode_s)
        results[name] = Measurement(prefill_s, decode_s, prefill_rate, decode_rate), rs[-1].tokens
    return results


# --- the GPU's limits -----------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy (median of 10), as ANCHORS.md counts."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times[2:])


def limits(loaded: LoadedModel, args: argparse.Namespace, device: torch.device) -> dict:
    """The floors a decode step cannot beat (one read of the weights it multiplies, and of every
    sequence's KV at the run's mean context, at the copy bandwidth) and the weight FLOPs of prefill."""
    config = loaded.config
    params = dict(loaded.model.named_parameters())
    embed = params["model.embed_tokens.weight"]
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    if not config.tie_word_embeddings:  # the embedding table is gathered from, not read whole
        weight_bytes -= embed.numel() * embed.element_size()
    matmul_params = sum(p.numel() for n, p in params.items() if p.dim() == 2 and "embed_tokens" not in n)
    if config.tie_word_embeddings:
        matmul_params += embed.numel()  # the LM head
    bandwidth = copy_bandwidth(device)
    mean_context = args.input_len + args.output_len / 2
    kv_token = config.kv_bytes_per_token(DTYPES[args.dtype].itemsize)
    floors = {}
    for b in args.batch_sizes:
        step_s = (weight_bytes + b * mean_context * kv_token) / bandwidth
        floors[b] = {"decode_floor_tok_s": b / step_s, "step_floor_ms": step_s * 1e3}
    log(
        f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s (read + written); "
        f"weights read per step {weight_bytes / 1e9:.2f} GB"
    )
    return {
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": weight_bytes,
        "prefill_flops_per_token": 2 * matmul_params,
        "floors": floors,
    }


# --- report -------------------------------------------------------------------------------------

Results = dict[int, dict[str, Measurement]]  # batch -> system -> measurement


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "-"


def rate(x: float | None) -> str:
    return f"{x:,.1f}" if x is not None else "-"


def report(info: dict, results: Results, same: dict[int, int]) -> str:
    lines = [
        f"machine: {info['machine']} ({info['threads']} threads), torch {info['torch']}, "
        f"transformers {info['transformers']}, {info['date']}",
        f"model: {info['model']} {info['dtype']} on {info['device']}; input {info['input_len']} tokens, "
        f"output {info['output_len']} tokens (greedy, no EOS); median of {info['repeats']} run(s) after "
        f"{info['warmup']} warm-up; ratio = pdserve / HF",
        "",
        "| batch | pdserve prefill tok/s | HF prefill tok/s | ratio "
        "| pdserve decode tok/s | HF decode tok/s | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, by_system in results.items():
        m, h = by_system["pdserve"], by_system.get("HF")
        hp, hd = (h.prefill_tok_s, h.decode_tok_s) if h else (None, None)
        lines.append(
            f"| {b} | {rate(m.prefill_tok_s)} | {rate(hp)} | {ratio(m.prefill_tok_s, hp)} "
            f"| {rate(m.decode_tok_s)} | {rate(hd)} | {ratio(m.decode_tok_s, hd)} |"
        )
    if "limits" in info:
        lim = info["limits"]
        lines += [
            "",
            f"GPU limits: copy {lim['copy_bandwidth_gb_s']:,.0f} GB/s (read + written), "
            f"{lim['weight_bytes'] / 1e9:.2f} GB of weights read per decode step",
            "",
            "| batch | decode floor tok/s | pdserve of floor | pdserve prefill weight TFLOP/s "
            "| HF prefill weight TFLOP/s |",
            "|---:|---:|---:|---:|---:|",
        ]
        for b, by_system in results.items():
            floor = lim["floors"][b]["decode_floor_tok_s"]
            tflops = {
                n: m.prefill_tok_s * lim["prefill_flops_per_token"] / 1e12 for n, m in by_system.items()
            }
            hf = f"{tflops['HF']:,.0f}" if "HF" in tflops else "-"
            lines.append(
                f"| {b} | {floor:,.0f} | {by_system['pdserve'].decode_tok_s / floor:.0%} "
                f"| {tflops['pdserve']:,.0f} | {hf} |"
            )
    if same:
        agree = ", ".join(f"batch {b}: {n}/{b}" for b, n in same.items())
        lines += ["", f"sequences whose greedy tokens are identical in both systems: {agree}"]
    return "\n".join(lines)


def write_json(info: dict, results: Results, same: dict[int, int], paths: list[Path]) -> None:
    rows = []
    for b, by_system in results.items():
        m, h = by_system["pdserve"], by_system.get("HF")
        rows.append(
            {
                "batch": b,
                "pdserve": asdict(m),
                "hf": asdict(h) if h else None,
                "prefill_ratio": m.prefill_tok_s / h.prefill_tok_s if h else None,
                "decode_ratio": m.decode_tok_s / h.decode_tok_s if h else None,
                "identical_sequences": same.get(b),
            }
        )
    text = json.dumps({**info, "results": rows}, indent=1)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        log(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = {
        "machine": machine_name(device),
        "torch": torch.__version__,
        "transformers": transformers_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **{k: v for k, v in vars(args).items() if k != "json"},
        "threads": torch.get_num_threads(),
    }
    try:
        systems, loaded = load_systems(args, device)
    except PDServeError as e:
        raise SystemExit(f"error: {e}") from None
    vocab = loaded.config.vocab_size
    if device.type == "cuda":
        info["limits"] = limits(loaded, args, device)
    results: Results = {}
    same: dict[int, int] = {}
    for b in args.batch_sizes:
        by_system = measure(systems, make_prompts(b, args.input_len, vocab, args.seed), args)
        results[b] = {name: m for name, (m, _) in by_system.items()}
        if "HF" in by_system and not args.model.startswith(DUMMY_PREFIX):  # dummy weights differ
            pairs = zip(by_system["pdserve"][1], by_system["HF"][1], strict=True)
            same[b] = sum(x == y for x, y in pairs)
    print(report(info, results, same))
    paths = [args.json] if args.json else []
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / "bench_engine.json")
    write_json(info, results, same, paths)


if __name__ == "__main__":
    main()
