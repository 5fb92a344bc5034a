"""The ranks beyond 0 of a tensor- or pipeline-parallel instance as Ray actors, one per GPU (or
per CPU share), each in its own bundle of the instance's placement group: bundle r holds rank r,
so the placement group decides where each rank runs (one node, or stages across nodes when the
instance needs more GPUs than a node has; cluster/deployment.py).

    instance actor (rank 0, bundle 0) ── RayRankLauncher.launch(RankStart) ──► RankActor (bundle r)
                                       ◄── steps and service channels over TCP ── run_rank(start)

The rank actors belong to the instance actor: when it dies Ray ends them too, and a rank that
dies fails the instance's next step, which ends the instance actor (cluster/actors.py), so Ray
restarts the instance whole and it starts fresh ranks in the same bundles.
"""

from __future__ import annotations

import os

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ClusterConfig
from engine.parallel.ranks import START_TIMEOUT, RankStart, run_rank


@ray.remote(max_restarts=0, max_concurrency=2)
class RankActor:
    """One rank's process: `run` holds it for the engine's life, `pid` answers beside it."""

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def run(self, start: RankStart) -> None:
        run_rank(start)
        os._exit(0)  # rank 0 stopped the engine: this process has nothing left to do


class RayRankHandle:
    def __init__(self, actor: ray.actor.ActorHandle, running: ray.ObjectRef, rank: int) -> None:
        self.actor = actor
        self.running = running
        self.name = f"rank {rank} (Ray actor)"
        self.pid: int | None = ray.get(actor.pid.remote(), timeout=START_TIMEOUT)
        self.node_id: str = ray.get(actor.node_id.remote(), timeout=START_TIMEOUT)

    def is_alive(self) -> bool:
        done, _ = ray.wait([self.running], timeout=0)
        return not done

    def join(self, timeout: float | None = None) -> None:
        ray.wait([self.running], timeout=timeout)

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


class RayRankLauncher:
    """Starts rank r in bundle r of `group` (rank 0 is the caller, in bundle 0)."""

    def __init__(self, group: PlacementGroup, num_cpus: float, num_gpus: int) -> None:
        self.group = group
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.host = ray.util.get_node_ip_address()

    def launch(self, start: RankStart) -> RayRankHandle:
        strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=start.rank)
        actor = RankActor.options(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            scheduling_strategy=strategy,
            name=None,
        ).remote()
        return RayRankHandle(actor, actor.run.remote(start), start.rank)


def instance_bundles(config: ClusterConfig, role: str) -> tuple[list[dict[str, float]], str]:
    """The placement group of one instance of `role`: a bundle per rank (its share of the pool's
    CPUs, and one GPU on a GPU deployment; rank 0, the instance actor, takes bundle 0), packed onto
    one node, or allowed across nodes when the instance has more GPUs than a node
    (`placement.gpus_per_node`), as a plan's pipeline stages may."""
    pool = config.pools[role]
    ranks = pool.tp * pool.pp
    gpu = config.model.device != "cpu"
    bundle = {"CPU": pool.cpus / ranks, **({"GPU": 1} if gpu else {})}
    spans = gpu and ranks > config.placement.gpus_per_node
    return [dict(bundle) for _ in range(ranks)], "PACK" if spans else "STRICT_PACK"
