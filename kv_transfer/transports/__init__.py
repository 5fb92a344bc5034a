"""Transports by name: `serve(kind, sink, **options)` on the receiving side, `connect(kind, address,
**options)` on the sending side. Each module is imported only when its kind is used.

    local  same process (tests, single-process runs)            transports/local.py
    shm    same node: shared-memory ring, CUDA IPC for GPU       transports/shm.py
    grpc   across nodes: streaming gRPC, TLS, shared token       transports/grpc.py
    ray    the Ray object store (the baseline)                   transports/ray.py
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from kv_transfer.errors import TransferError
from kv_transfer.transport import Connection, FrameSink, TransportServer

_CLASSES = {
    "local": ("kv_transfer.transports.local", "LocalServer", "LocalConnection"),
    "shm": ("kv_transfer.transports.shm", "ShmServer", "ShmConnection"),
    "grpc": ("kv_transfer.transports.grpc", "GrpcServer", "GrpcConnection"),
    "ray": ("kv_transfer.transports.ray", "RayServer", "RayConnection"),
}
KINDS = tuple(_CLASSES)


def _classes(kind: str) -> tuple[type, type]:
    if kind not in _CLASSES:
        raise TransferError(f"unknown KV transport {kind!r}; choose one of {', '.join(KINDS)}")
    module, server, connection = _CLASSES[kind]
    mod = importlib.import_module(module)
    return getattr(mod, server), getattr(mod, connection)


def serve(kind: str, sink: FrameSink, **options: Any) -> TransportServer:
    return _classes(kind)[0](sink, **options)


def connect(kind: str, address: str, **options: Any) -> Connection:
    return _classes(kind)[1](address, **options)


def connector(token: str | None = None) -> Callable[[tuple[str, str]], Connection]:
    """How a sender opens a link to a receiver's (kind, address); gRPC links carry `token`."""

    def connect_endpoint(endpoint: tuple[str, str]) -> Connection:
        kind, address = endpoint
        return connect(kind, address, **({"token": token} if kind == "grpc" else {}))

    return connect_endpoint


def serve_kinds(
    kinds: tuple[str, ...], sink: FrameSink, host: str = "127.0.0.1", token: str | None = None
) -> dict[str, TransportServer]:
    """One server per kind around `sink` (gRPC on `host`, with `token`); closes them all if one fails."""
    servers: dict[str, TransportServer] = {}
    try:
        for kind in kinds:
            servers[kind] = serve(kind, sink, **({"host": host, "token": token} if kind == "grpc" else {}))
    except BaseException:
        for server in servers.values():
            server.close()
        raise
    return servers
