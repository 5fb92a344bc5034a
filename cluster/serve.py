"""`pdserve serve --config FILE`: the whole cluster from one config file.

join or start Ray ──► pools as actors in placement groups ──► controller (waits until every
instance answers) ──► gRPC and HTTP front ends ──► "ready" with the endpoints
SIGINT / SIGTERM ──► health NOT_SERVING, refuse new requests, drain those in flight (bounded),
                     stop the front ends, the actors and (if we started it) Ray
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace

import ray

from cluster.config import ClusterConfig
from cluster.controller import Controller
from cluster.deployment import Deployment, connect_ray
from cluster.grpc_server import GrpcServer
from cluster.http_server import HttpServer
from cluster.metrics import Metrics
from cluster.protocol import ModelCard
from cluster.validation import RequestValidator
from engine.model_config import ModelConfig
from engine.model_loader import resolve_checkpoint


class ClusterServer:
    def __init__(self, config: ClusterConfig) -> None:
        config.check_servable()
        self.config = config
        self.metrics = Metrics()
        self.deployment = Deployment(config)
        self.controller: Controller | None = None
        self.grpc: GrpcServer | None = None
        self.http: HttpServer | None = None
        self._started_ray = False
        self._health: asyncio.Task | None = None

    async def start(self) -> None:
        config = self.config
        self._started_ray = connect_ray(config)
        source = resolve_checkpoint(config.model.name)
        model_config = source if isinstance(source, ModelConfig) else source.config
        tokenizer = None if isinstance(source, ModelConfig) else source.tokenizer()
        max_len = min(config.model.max_model_len or model_config.max_model_len, model_config.max_model_len)
        dtype = (
            config.model.dtype
            if config.model.dtype != "auto"
            else ("float32" if config.num_gpus == 0 else "bfloat16")
        )
        card = ModelCard(config.model.name, max_len, dtype)
        validator = RequestValidator(card, tokenizer, model_config.vocab_size, config.server.max_tokens_limit)
        instances = await asyncio.to_thread(self.deployment.start)
        self.controller = Controller(config, card, validator, self.metrics, instances)
        await self.controller.start()
        server = config.server
        self.grpc = GrpcServer(
            self.controller, self.metrics, server.host, server.grpc_port, server.auth_token
        )
        self.http = HttpServer(
            self.controller, self.metrics, server.host, server.http_port, server.auth_token
        )
        await self.grpc.start()
        await self.http.start()
        self._health = asyncio.create_task(self._follow_health(), name="grpc-health")

    async def _follow_health(self) -> None:
        """gRPC health says SERVING only while the controller can route (both pools have a live
        instance, not draining); HTTP /health asks the controller directly."""
        serving = None
        while True:
            healthy = self.controller.is_healthy()
            if healthy != serving:
                self.grpc.set_serving(healthy)
                serving = healthy
            await asyncio.sleep(0.5)

    @property
    def endpoints(self) -> dict[str, str]:
        host = self.config.server.host
        return {"grpc": f"{host}:{self.grpc.port}", "http": f"http://{host}:{self.http.port}"}

    async def stop(self, drain_timeout: float = 30.0) -> None:
        if self._health is not None:
            self._health.cancel()
        if self.grpc is not None:
            self.grpc.set_serving(False)
        if self.controller is not None:
            await self.controller.drain(drain_timeout)
        for front in (self.http, self.grpc):
            if front is not None:
                await front.stop()
        if self.controller is not None:
            await self.controller.stop()
        await asyncio.to_thread(self.deployment.stop)
        if self._started_ray:
            ray.shutdown()


def usage(server: ClusterServer) -> str:
    """The endpoints and one copy-paste call for each."""
    e = server.endpoints
    token = server.config.server.auth_token
    auth_h = f' -H "Authorization: Bearer {token}"' if token else ""
    auth_g = f" -H 'authorization: Bearer {token}'" if token else ""
    model = server.controller.model.id
    body = (
        f'{{"model": "{model}", "max_tokens": 32, "temperature": 0, '
        '"messages": [{"role": "user", "content": "What is the capital of France?"}]}'
    )
    return "\n".join(
        [
            f"pdserve is serving {model}",
            f"  OpenAI HTTP  {e['http']}/v1   (also /health, /metrics)",
            f"  gRPC         {e['grpc']}   (pdserve.v1.PDServe, grpc.health.v1, reflection)",
            "",
            "Try:",
            f"  curl -s {e['http']}/v1/chat/completions -H 'Content-Type: application/json'{auth_h} \\",
            f"    -d '{body}'",
            f'  grpcurl -plaintext{auth_g} -d \'{{"prompt": "The capital of France is", '
            f'"sampling": {{"max_tokens": 16, "temperature": 0}}}}\' {e["grpc"]} pdserve.v1.PDServe/Generate',
            "",
            "Ctrl-C drains and stops.",
        ]
    )


async def serve(config: ClusterConfig, grpc_port: int | None = None, http_port: int | None = None) -> None:
    """Run until SIGINT or SIGTERM, then drain and stop."""
    overrides = {k: v for k, v in (("grpc_port", grpc_port), ("http_port", http_port)) if v is not None}
    if overrides:
        config = replace(config, server=replace(config.server, **overrides))
    server = ClusterServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        await server.start()
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
            loop.add_signal_handler(sig, stop.set)
        print(usage(server), flush=True)
        await stop.wait()
        print("pdserve: draining and stopping ...", flush=True)
    finally:
        await server.stop()
