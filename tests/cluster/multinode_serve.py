"""Run as a script by test_e2e_multinode.py: a two-node Ray cluster on this machine
(ray.cluster_utils: two raylets, one CPU each), a decode instance of two pipeline stages spread
over both nodes (STRICT_SPREAD instead of the usual packing), greedy requests over gRPC. Prints
one JSON line: the tokens of each prompt, every instance's rank nodes and the KV transport the
controller chose."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading

import ray
from ray.cluster_utils import Cluster

import cluster.deployment as deployment
from cluster.config import config_from_dict
from cluster.rank_actors import instance_bundles
from cluster.serve import ClusterServer

sys.path.insert(0, os.path.dirname(__file__))
from test_e2e import AUTH, PROMPTS, grpc_generate, pb_grpc  # noqa: E402


def spread(config, role):
    bundles, _ = instance_bundles(config, role)
    return bundles, "STRICT_SPREAD" if len(bundles) > 1 else "STRICT_PACK"


def main() -> None:
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    os.environ["RAY_ADDRESS"] = nodes.address
    deployment.instance_bundles = spread  # the placement group of a two-stage instance spans both nodes
    config = config_from_dict(
        {
            "model": {"name": "smollm2-135m", "dtype": "float32", "device": "cpu"},
            "prefill": {"max_num_batched_tokens": 256, "chunk_size": 64, "cpus": 0.5},
            "decode": {"max_batch": 8, "kv_cache_memory": "64MiB", "cpus": 1.0, "pp": 2},
            "server": {"grpc_port": 0, "http_port": 0, "auth_token": AUTH[0][1].removeprefix("Bearer ")},
        }
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = ClusterServer(config)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(600)
    try:
        import grpc

        with grpc.insecure_channel(server.endpoints["grpc"]) as channel:
            stub = pb_grpc.PDServeStub(channel)
            tokens = [grpc_generate(stub, prompt, 12)[0] for prompt in PROMPTS]
        controller = server.controller
        instances = {name: list(i.info.nodes) for name, i in controller.instances.items()}
        prefill = controller.instances["prefill-0"]
        decode = controller.instances["decode-0"]
        kind = controller._destination(prefill, decode).kind
        print(json.dumps({"tokens": tokens, "nodes": instances, "kind": kind}), flush=True)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(drain_timeout=10), loop).result(120)
        ray.shutdown()  # joined, not started, by the server: the driver lets go before the nodes stop
        nodes.shutdown()


if __name__ == "__main__":
    main()
