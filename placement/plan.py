"""From a deployment config to a plan and back: `pdserve plan` builds the search from the config's
model, SLOs, batching and `placement` section, prints the ranked table and writes a plan file;
`apply_plan` rewrites a config's pools from a plan, which is what `pdserve serve` runs.

Plan file (YAML): the inputs it was made for and the chosen pools,

    format: 1
    model: ..., gpu: ..., slo: {ttft_ms, tpot_ms, attainment}, rate: req/s or null
    chosen: {kind, prefill: {instances, tp, pp}, decode: {...}, colocated: null, codec,
             gpus, goodput, goodput_per_gpu, attainment}
    ranked: [the same for every verified candidate, best first]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cluster.config import ClusterConfig
from cluster.instance import batching
from engine.model_config import ModelConfig
from engine.model_loader import resolve_checkpoint
from engine.scheduler import SchedulerConfig
from placement.errors import PlacementError
from placement.hardware import ClusterSpec, gpu_spec
from placement.planner import Candidate, Parallelism, Planner, PoolPlan, SearchResult, SearchSpace
from placement.profiler import Profile
from placement.simulator import SLO, RequestResult, Simulator
from placement.workload import (
    RequestSpec,
    at_rate,
    load_trace,
    poisson_requests,
    scale_lengths,
    workload_preset,
)

PLAN_FORMAT = 1
SAME_NODE_TRANSPORTS = ("local", "shm")  # KV moves inside a node (the others may cross nodes)


def model_config(config: ClusterConfig) -> ModelConfig:
    source = resolve_checkpoint(config.model.name)
    return source if isinstance(source, ModelConfig) else source.config


def search_space(config: ClusterConfig) -> SearchSpace:
    placement = config.placement
    model = model_config(config)
    gpu = gpu_spec(placement.gpu)
    hardware = ClusterSpec(
        placement.nodes, placement.gpus_per_node, gpu, float(placement.inter_node_bandwidth)
    )
    max_len = min(config.model.max_model_len or model.max_model_len, model.max_model_len)
    if placement.trace is not None:
        requests = scale_lengths(load_trace(placement.trace), placement.length_scale)
        too_long = [i for i, r in enumerate(requests) if r.input_len + r.output_len > max_len]
        if too_long:
            raise PlacementError(
                f"{placement.trace}: request {too_long[0] + 1} has more tokens than the model's "
                f"context of {max_len}"
            )
        requests = at_rate(requests, 1.0)
    else:
        workload = workload_preset(placement.workload).scaled(placement.length_scale)
        requests = poisson_requests(workload, 1.0, placement.num_requests, placement.seed, max_len)
    slo = config.slo
    kv_memory = {"prefill": config.prefill.kv_cache_memory, "decode": config.decode.kv_cache_memory}
    kv_memory["colocated"] = config.decode.kv_cache_memory
    profiles = () if placement.profile is None else (Profile.load(placement.profile),)
    algorithms = (
        ("high_affinity", "low_affinity", "colocated")
        if placement.algorithm == "all"
        else (placement.algorithm,)
    )
    return SearchSpace(
        model=model,
        hardware=hardware,
        requests=tuple(requests),
        slo=SLO(slo.ttft_ms / 1e3, slo.tpot_ms / 1e3, slo.attainment),
        prefill_scheduler=SchedulerConfig(**batching(config, "prefill")),
        decode_scheduler=SchedulerConfig(**batching(config, "decode")),
        colocated_scheduler=SchedulerConfig(**batching(config, "colocated")),
        rate=placement.rate,
        max_gpus=placement.max_gpus,
        codecs=placement.codecs or (config.kv_transfer.codec,),
        kv_memory=kv_memory,
        layerwise=config.kv_transfer.layerwise,
        profiles=profiles,
        algorithms=algorithms,
    )


def plan(config: ClusterConfig, progress: Callable[[str], None] | None = None) -> SearchResult:
    """Search; raises PlacementError saying which constraint binds when nothing is feasible."""
    space = search_space(config)
    result = Planner(space).search(progress)
    if not result.candidates:
        raise PlacementError(_infeasible(space, result))
    return result


def _infeasible(space: SearchSpace, result: SearchResult) -> str:
    lines = ["no feasible plan:"]
    if result.rejected:
        lines += [f"  - {reason}" for reason in result.rejected[:8]]
    else:
        lines.append(
            f"  - no configuration meets TTFT <= {space.slo.ttft * 1e3:g} ms and TPOT <= "
            f"{space.slo.tpot * 1e3:g} ms for {space.slo.attainment:.0%} of requests even at a trickle "
            f"of traffic on {space.hardware.gpu.name}; loosen the SLOs or use faster GPUs"
        )
    return "\n".join(lines)


# --- output -------------------------------------------------------------------------------------


def table(result: SearchResult) -> str:
    at = "at target rate" if result.space.rate is not None else "at its goodput"
    rows = [
        f"| # | configuration | GPUs | goodput (req/s) | goodput/GPU | attainment {at} |",
        "|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(result.candidates, 1):
        rows.append(
            f"| {i} | {c.describe()} | {c.gpus} | {c.goodput:.2f} | {c.goodput_per_gpu:.3f} | "
            f"{c.attainment:.1%} |"
        )
    return "\n".join(rows)


def _pool(plan: Any) -> dict[str, int] | None:
    if plan is None:
        return None
    return {"instances": plan.instances, "tp": plan.parallelism.tp, "pp": plan.parallelism.pp}


def _candidate(c: Candidate) -> dict[str, Any]:
    return {
        "kind": c.kind,
        "prefill": _pool(c.prefill),
        "decode": _pool(c.decode),
        "colocated": _pool(c.colocated),
        "codec": c.codec,
        "gpus": c.gpus,
        "goodput": round(c.goodput, 4),
        "goodput_per_gpu": round(c.goodput_per_gpu, 4),
        "attainment": round(c.attainment, 4),
        "description": c.describe(),
    }


def save_plan(path: str | Path, config: ClusterConfig, result: SearchResult) -> dict[str, Any]:
    p, slo = config.placement, config.slo
    data = {
        "format": PLAN_FORMAT,
        "model": config.model.name,
        "gpu": p.gpu,
        "nodes": p.nodes,
        "gpus_per_node": p.gpus_per_node,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "attainment": slo.attainment},
        "rate": p.rate,
        "chosen": _candidate(result.candidates[0]),
        "ranked": [_candidate(c) for c in result.candidates],
    }
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def load_plan(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PlacementError(f"{path}: cannot read the plan file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or "chosen" not in data:
        raise PlacementError(
            f"{path}: not a pdserve plan file (format {PLAN_FORMAT}); make one with pdserve plan"
        )
    return data


def apply_plan(config: ClusterConfig, chosen: dict[str, Any]) -> ClusterConfig:
    """The config with its pools and codec set to the plan's choice (any tp and pp: the KV is
    re-sharded in transit between pools laid out differently)."""
    roles = ("colocated",) if chosen.get("colocated") else ("prefill", "decode")
    pools = {}
    for role in roles:
        pool = chosen[role]
        pools[role] = dataclasses.replace(
            getattr(config, role), instances=pool["instances"], tp=pool["tp"], pp=pool["pp"]
        )
    kv = dataclasses.replace(config.kv_transfer, codec=chosen["codec"])
    if "colocated" not in pools:  # a disaggregated plan: no colocated replicas, whatever the file said
        pools["colocated"] = dataclasses.replace(config.colocated, instances=0)
    return dataclasses.replace(config, **pools, kv_transfer=kv)


def resolve(config: ClusterConfig, progress: Callable[[str], None] | None = None) -> ClusterConfig:
    """What `pdserve serve` runs: the config itself (manual), its plan file's pools, or (auto) a
    fresh plan's."""
    placement = config.placement
    if placement.plan is not None:
        return apply_plan(config, load_plan(placement.plan)["chosen"])
    if placement.mode == "auto":
        return apply_plan(config, _candidate(plan(config, progress).candidates[0]))
    return config


def configured(config: ClusterConfig) -> Candidate:
    """The config's own pools (as written, before any plan) as a candidate, to be simulated."""
    if config.is_colocated:
        c = config.colocated
        replicas = PoolPlan(Parallelism(c.tp, c.pp), c.instances, math.nan)
        return Candidate("colocated", None, None, replicas, config.kv_transfer.codec, math.nan)
    pools = {
        role: PoolPlan(Parallelism(pool.tp, pool.pp), pool.instances, math.nan)
        for role, pool in (("prefill", config.prefill), ("decode", config.decode))
    }
    transport = config.kv_transfer.transport
    same_node = transport in SAME_NODE_TRANSPORTS or (transport == "auto" and config.placement.nodes == 1)
    kind = "low_affinity" if same_node else "high_affinity"
    return Candidate(kind, pools["prefill"], pools["decode"], None, config.kv_transfer.codec, math.nan)


Predictor = Callable[[list[RequestSpec], Profile | None], list[RequestResult]]


def predictor(config: ClusterConfig) -> Predictor:
    """The simulator on the config's own pools (search space built once): given requests (arrival
    times as they are) and a profile, or None for the one `placement.profile` names (else the
    roofline), each request's simulated TTFT and TPOT."""
    space, candidate = search_space(config), configured(config)

    def simulate(requests: list[RequestSpec], profile: Profile | None = None) -> list[RequestResult]:
        chosen = space if profile is None else dataclasses.replace(space, profiles=(profile,))
        return Simulator(Planner(chosen).whole(candidate)).run(requests).requests

    return simulate


def plot(path: str | Path, title: str, result: SearchResult, top: int = 3, points: int = 8) -> None:
    """Attainment against rate for the best `top` candidates (matplotlib), simulated on the
    search's own space."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlacementError("--plot needs matplotlib: pip install 'pdserve[plot]'") from None
    planner = Planner(result.space)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in result.candidates[:top]:
        rates = [c.goodput * (0.25 + 1.5 * i / (points - 1)) for i in range(points)]
        cluster = planner.whole(c)
        ax.plot(rates, [100 * planner.attainment(cluster, r) for r in rates], marker="o", label=c.describe())
    ax.axhline(100 * result.space.slo.attainment, color="grey", linestyle="--", label="target")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
