"""Starting the pools on Ray (prefill and decode, or colocated replicas): one placement group per
instance (a bundle per tensor/pipeline rank, on one node unless the instance needs more GPUs than
a node has), the instance's actor in bundle 0 (its other ranks' actors, cluster/rank_actors.py,
in the others), restarted by Ray when it dies. Also joining the Ray cluster:
RAY_ADDRESS, else the one `ray up` started on this node, else a new local one."""

from __future__ import annotations

import logging
import math
import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import DecodeActor, PrefillActor
from cluster.config import ClusterConfig
from cluster.controller import Instance
from cluster.rank_actors import instance_bundles

log = logging.getLogger(__name__)
NAMESPACE = "pdserve"


def connect_ray(config: ClusterConfig) -> bool:
    """Join or start Ray; True when this process started it (and should shut it down)."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    options = {"namespace": NAMESPACE, "log_to_driver": True, "configure_logging": False}
    if address:
        ray.init(address=address, **options)
        return False
    try:
        ray.init(address="auto", **options)  # a cluster `ray up` / `ray start` made on this node
        return False
    except (ConnectionError, RuntimeError):
        pass
    need = sum(p.instances * p.cpus for p in config.pools.values())
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
        num_gpus=config.num_gpus or None,
        include_dashboard=False,
        **options,
    )
    return True


class Deployment:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.instances: list[Instance] = []
        self._groups = []

    def start(self, timeout: float = 600.0) -> list[Instance]:
        for role, pool in self.config.pools.items():
            actor_class = PrefillActor if role == "prefill" else DecodeActor  # colocated: DecodeActor
            role_arg = () if role == "prefill" else (role,)
            bundles, strategy = instance_bundles(self.config, role)
            for i in range(pool.instances):
                group = placement_group(bundles, strategy=strategy, name=f"pdserve-{role}-{i}")
                self._groups.append(group)
                name = f"{role}-{i}"
                handle = actor_class.options(
                    num_cpus=bundles[0]["CPU"],
                    num_gpus=bundles[0].get("GPU", 0),
                    max_restarts=-1,
                    max_task_retries=0,
                    max_concurrency=1000,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=0
                    ),
                ).remote(self.config, name, *role_arg)
                self.instances.append(Instance(name, role, handle))
        ready = [g.ready() for g in self._groups]
        _, pending = ray.wait(ready, num_returns=len(ready), timeout=timeout)
        if pending:
            raise TimeoutError(
                f"{len(pending)} placement groups could not be placed in {timeout:.0f}s: the cluster lacks "
                f"the CPUs/GPUs the config asks for ({ray.available_resources()} available)"
            )
        return self.instances

    def stop(self) -> None:
        for instance in self.instances:
            try:
                ray.kill(instance.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        for group in self._groups:
            try:
                remove_placement_group(group)
            except Exception:  # noqa: BLE001
                pass
        self.instances, self._groups = [], []
