"""`ConnectionPool`: one sending process's open links to KV receivers, by (transport kind,
address), opened on first use and dropped when a transfer over them fails to start."""

from __future__ import annotations

import threading
from collections.abc import Callable

from kv_transfer.transport import Connection

Endpoint = tuple[str, str]  # (transport kind, address)


class ConnectionPool:
    def __init__(self, connect: Callable[[Endpoint], Connection]) -> None:
        self._connect = connect
        self._connections: dict[Endpoint, Connection] = {}
        self._lock = threading.Lock()

    def get(self, endpoint: Endpoint) -> Connection:
        with self._lock:
            connection = self._connections.get(endpoint)
            if connection is None:
                connection = self._connections[endpoint] = self._connect(endpoint)
            return connection

    def drop(self, endpoint: Endpoint) -> None:
        """Forget a link that failed (the receiver restarted, say); the next get opens a new one."""
        with self._lock:
            connection = self._connections.pop(endpoint, None)
        if connection is not None:
            connection.close()

    def close(self) -> None:
        with self._lock:
            connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            connection.close()
