"""Two CPU step costs of the engine, each with and without the measure that addresses it, side by side
on one core (the embedded model, float32):

- prefill of 1,024 tokens with glibc's default malloc against `engine/cpu_allocator.py`'s settings
  (minor page faults and time per prefill);
- a decode step over a chatbot-like mix of contexts with one padded attention call against
  `group_by_length`'s groups.

Each variant runs in its own process (malloc settings are per process), alternating, `--repeats`
times; medians are printed as a markdown table.

    .venv/bin/python scripts/bench_cpu_steps.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time


def prefill(variant: str) -> dict:
    import engine.model_runner as model_runner

    if variant == "glibc defaults":
        model_runner.keep_freed_memory = lambda: None
    from engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", kv_cache_memory=256 << 20))
    rng = random.Random(0)
    times, faults = [], []
    for i in range(12):
        engine.add_request([rng.randrange(1000, 20000) for _ in range(1024)], SamplingParams(max_tokens=1))
        before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"ms": 1e3 * statistics.median(times), "faults": statistics.median(faults)}


def decode(variant: str) -> dict:
    import engine.model_runner as model_runner

    if variant == "one padded call":
        model_runner.group_by_length = lambda widths, *args: [list(range(len(widths)))]
    from engine import EngineConfig, LLMEngine, SamplingParams
    from placement.workload import workload_preset

    engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", kv_cache_memory=512 << 20))
    rng = random.Random(1)
    lengths = workload_preset("chatbot").scaled(0.5).input.sample(rng, 16)
    for n in lengths:
        engine.add_request(
            [rng.randrange(1000, 20000) for _ in range(n)], SamplingParams(max_tokens=200, ignore_eos=True)
        )
    while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
        engine.step()
    times = []
    for _ in range(40):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(times[5:]), "contexts": sorted(lengths)}


BENCHES = {
    "prefill": (prefill, ("glibc defaults", "cpu_allocator")),
    "decode": (decode, ("one padded call", "length groups")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(1)
        bench, variant = args.child
        print(json.dumps(BENCHES[bench][0](variant)))
        return
    for bench, (_, variants) in BENCHES.items():
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for variant in variants:
                cmd = [sys.executable, __file__, "--child", bench, variant]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results[variant].append(json.loads(out.strip().splitlines()[-1]))
        print(f"\n{bench}:\n\n| variant | median ms | runs (ms) | page faults |\n|---|---:|---|---:|")
        for variant, runs in results.items():
            ms = [r["ms"] for r in runs]
            faults = statistics.median(r.get("faults", 0) for r in runs) if "faults" in runs[0] else "-"
            each = ", ".join(f"{m:.1f}" for m in ms)
            print(f"| {variant} | {statistics.median(ms):.1f} | {each} | {faults} |")
        if bench == "decode":
            print(f"\ncontexts: {results[variants[0]][0]['contexts']}")


if __name__ == "__main__":
    main()
