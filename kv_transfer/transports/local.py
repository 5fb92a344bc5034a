"""The in-process transport: frames are handed to the sink directly (tests, single-process runs).

It still enforces the transport contract: a sink error for any frame of a request is kept and
raised from that request's `end`, and later frames of a failed request are dropped.
"""

from __future__ import annotations

import itertools
import threading

from kv_transfer.errors import PeerDisconnectedError, TransferError, TransferTimeoutError
from kv_transfer.frame import peek_request_id
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
        if address not in _SERVERS:
            raise PeerDisconnectedError(f"no local KV transfer server at {address!r}")
        self.address = address
        self._failed: dict[str, TransferError] = {}
        self._open: set[str] = set()  # requests with frames sent and no end or abort yet

    def _server(self) -> LocalServer:
        server = _SERVERS.get(self.address)
        if server is None:
            raise PeerDisconnectedError(f"the KV transfer server at {self.address!r} has closed")
        return server

    def send(self, frame: Frame) -> None:
        request_id = peek_request_id(frame.header)
        if request_id in self._failed:
            return
        server = self._server()
        if request_id is not None:
            self._open.add(request_id)
        try:
            with server.lock:
                server.sink.on_frame(frame)
        except TransferError as exc:
            self._failed[request_id] = exc
        except Exception as exc:  # noqa: BLE001 - a sink bug fails the request, not the sender
            self._failed[request_id] = TransferError(f"the receiver failed on a frame: {exc!r}")

    def end(self, request_id: str, num_frames: int, timeout: float) -> None:
        if timeout <= 0:
            raise TransferTimeoutError(f"transfer of {request_id!r} ran past its deadline")
        self._open.discard(request_id)
        error = self._failed.pop(request_id, None)
        if error is not None:
            raise error
        server = self._server()
        with server.lock:
            server.sink.on_end(request_id, num_frames)

    def abort(self, request_id: str, reason: str) -> None:
        self._failed.pop(request_id, None)
        self._open.discard(request_id)
        server = _SERVERS.get(self.address)
        if server is not None:
            with server.lock:
                server.sink.on_abort(request_id, reason)

    def close(self) -> None:
        """Like a dropped link: the receiver drops every request this connection left open."""
        for request_id in sorted(self._open):
            self.abort(request_id, "peer disconnected")
        self._failed.clear()
