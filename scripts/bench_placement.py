"""The placement optimizer's figures: the simulator against M/D/1 queueing, the search time on a
4-node x 8-GPU H100 cluster, and the plans it makes for DistServe's three applications.

    .venv/bin/python scripts/bench_placement.py
    .venv/bin/python scripts/bench_placement.py --search-only --applications summarization  # to profile
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from cluster.config import config_from_dict
from engine.scheduler import SchedulerConfig
from placement import plan as planning
from placement.latency import FixedLatency
from placement.simulator import PoolSpec, SimCluster, Simulator
from placement.workload import RequestSpec

# DistServe's SLOs per application (TTFT s, TPOT s), with the workload preset shaped like it.
APPLICATIONS = {"chatbot": (0.25, 0.1), "code": (0.125, 0.2), "summarization": (15.0, 0.15)}


def md1() -> None:
    print("| load R*D | simulated mean TTFT (ms) | M/D/1 (ms) | error |\n|---|---|---|---|")
    service = 0.1
    for load in (0.3, 0.5, 0.7, 0.8):
        rate, rng, t, requests = load / service, random.Random(0), 0.0, []
        for _ in range(50000):
            t += rng.expovariate(rate)
            requests.append(RequestSpec(t, 100, 1))
        pool = PoolSpec(1, FixedLatency(service), SchedulerConfig(1, 100, 100), num_blocks=64)
        result = Simulator(SimCluster(prefill=pool, dispatch_delay=0, start_delay=0)).run(requests)
        simulated = statistics.mean(r.ttft for r in result.requests)
        theory = service + rate * service**2 / (2 * (1 - rate * service))
        print(f"| {load} | {simulated * 1e3:.1f} | {theory * 1e3:.1f} | {simulated / theory - 1:+.1%} |")


def plans(applications: list[str]) -> None:
    for workload in applications:
        ttft, tpot = APPLICATIONS[workload]
        config = config_from_dict(
            {
                "model": {"name": "dummy:llama-3.1-8b", "device": "cuda"},
                "slo": {"ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3, "attainment": 0.9},
                "placement": {
                    "mode": "auto",
                    "gpu": "h100-80gb",
                    "nodes": 4,
                    "gpus_per_node": 8,
                    "workload": workload,
                    "codecs": ["none", "int8"],
                },
            }
        )
        start = time.perf_counter()
        result = planning.plan(config)
        elapsed = time.perf_counter() - start
        print(
            f"\n{workload} (TTFT {ttft} s, TPOT {tpot} s): {result.num_simulations} simulations, "
            f"search {elapsed:.1f} s\n"
        )
        print(planning.table(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--search-only", action="store_true", help="skip the M/D/1 check")
    parser.add_argument(
        "--applications",
        default=",".join(APPLICATIONS),
        help=f"comma-separated, of {', '.join(APPLICATIONS)} (default: all)",
    )
    args = parser.parse_args()
    chosen = args.applications.split(",")
    unknown = sorted(set(chosen) - set(APPLICATIONS))
    if unknown:
        parser.error(f"unknown application(s) {', '.join(unknown)}; choose from {', '.join(APPLICATIONS)}")
    if not args.search_only:
        md1()
    plans(chosen)
