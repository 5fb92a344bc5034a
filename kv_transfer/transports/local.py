"""The in-process transport: frames are handed to the sink directly (tests, single-process runs).

It keeps the transport contract through the same SinkEndpoint as the other servers: a sink error
for any frame of a request is raised from that request's `end`, later frames of a failed request
are dropped, and closing the connection drops the requests it left open.
"""

from __future__ import annotations

import itertools
import threading

from kv_transfer.errors import PeerDisconnectedError, TransferTimeoutError
from kv_transfer.frame import peek_request_id
from kv_transfer.sink_endpoint import SinkEndpoint
from kv_transfer.transport import Connection, Frame, FrameSink, TransportServer

_SERVERS: dict[str, LocalServer] = {}
_IDS = itertools.count()


class LocalServer(TransportServer):
    def __init__(self, sink: FrameSink) -> None:
        self.sink = sink
        self._address = f"local://{next(_IDS)}"
        self.lock = threading.Lock()  # one call into the sink at a time, as remote servers do
        _SERVERS[self._address] = self

    @property
    def address(self) -> str:
        return self._address

    def close(self) -> None:
        _SERVERS.pop(self._address, None)


class LocalConnection(Connection):
    def __init__(self, address: str) -> None:
        server = _SERVERS.get(address)
        if server is None:
            raise PeerDisconnectedError(f"no local KV transfer server at {address!r}")
        self.address = address
        self._endpoint = SinkEndpoint(server.sink, server.lock)

    def _check_server(self) -> None:
        if self.address not in _SERVERS:
            raise PeerDisconnectedError(f"the KV transfer server at {self.address!r} has closed")

    def send(self, frame: Frame) -> None:
        self._check_server()
        self._endpoint.frame(peek_request_id(frame.header) or "", frame)

    def end(self, request_id: str, num_frames: int, timeout: float) -> None:
        if timeout <= 0:
            raise TransferTimeoutError(f"transfer of {request_id!r} ran past its deadline")
        self._check_server()
        error = self._endpoint.end(request_id, num_frames)
        if error is not None:
            raise error

    def abort(self, request_id: str, reason: str) -> None:
        if self.address in _SERVERS:
            self._endpoint.abort(request_id, reason)

    def close(self) -> None:
        """Like a dropped link: the receiver drops every request this connection left open."""
        if self.address in _SERVERS:
            self._endpoint.abort_open("peer disconnected")
