"""What every transport server keeps per connection around its FrameSink, written once.

    begin(request)          a frame of the request started arriving (the request is open)
    frame(request, frame)   the request is open; delivered unless it already failed
    fail(request, error)    the transport itself rejected a frame (too large, malformed, lost):
                            kept for the end, and the sink is told to let the request go now
    end(request, n)         the first error of the request, else the sink's on_end verdict
    abort(request, reason)  forget the request; the sink drops it
    abort_open(reason)      the link broke: every request that began and did not end is dropped

A request's first error wins: its later frames are dropped, and `end` reports that error with its
class. Errors that are not TransferErrors (a bug in a sink) are logged and reported as
TransferError. Calls into the sink hold `sink_lock`, shared by every connection of one server, so
the sink sees one call at a time; the endpoint's own state has its own lock, so a transport may
call `abort_open` from another thread (gRPC's termination callback) while frames are delivered.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kv_transfer.errors import TransferError
from kv_transfer.transport import Frame, FrameSink

logger = logging.getLogger(__name__)


class SinkEndpoint:
    def __init__(self, sink: FrameSink, sink_lock: threading.Lock | None = None) -> None:
        self.sink = sink
        self.sink_lock = sink_lock or threading.Lock()
        self._lock = threading.RLock()
        self._failed: dict[str, TransferError] = {}  # request -> its first error, until its end
        self._open: set[str] = set()  # requests that began and neither ended nor were aborted
        self.closed = False

    def has_failed(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._failed

    def begin(self, request_id: str) -> None:
        """A frame of the request started arriving: if the link breaks now, the request is dropped."""
        with self._lock:
            if not self.closed and request_id not in self._failed:
                self._open.add(request_id)

    def frame(self, request_id: str, frame: Frame | Callable[[], Frame]) -> None:
        """Deliver a frame (or a callable building it, skipped when the request already failed)."""
        with self._lock:
            if self.closed:
                return
            self._open.add(request_id)
            if request_id in self._failed:
                return
            try:
                with self.sink_lock:
                    self.sink.on_frame(frame if isinstance(frame, Frame) else frame())
            except Exception as exc:  # noqa: BLE001 - reported at the request's end
                what = f"the KV sink failed on a frame of {request_id!r}"
                self._failed[request_id] = _as_transfer_error(exc, what)

    def fail(self, request_id: str, error: TransferError) -> None:
        """The transport rejected a frame of the request: report `error` at its end, and tell the
        sink now, so the receiver frees what it reserved without waiting for a deadline."""
        with self._lock:
            if request_id in self._failed:
                return
            self._failed[request_id] = error
            self._open.discard(request_id)
            self._tell_abort(request_id, f"{type(error).__name__}: {error}")

    def end(self, request_id: str, num_frames: int) -> TransferError | None:
        """None when the receiver acknowledged the request, else the error to send back."""
        with self._lock:
            self._open.discard(request_id)
            error = self._failed.pop(request_id, None)
            if error is not None:
                return error
            try:
                with self.sink_lock:
                    self.sink.on_end(request_id, num_frames)
            except Exception as exc:  # noqa: BLE001 - sent back to the sender
                return _as_transfer_error(exc, f"the KV sink failed ending {request_id!r}")
            return None

    def abort(self, request_id: str, reason: str) -> None:
        with self._lock:
            self._open.discard(request_id)
            self._failed.pop(request_id, None)
            self._tell_abort(request_id, reason)

    def abort_open(self, reason: str = "peer disconnected") -> None:
        """The link is gone: drop every open request; later calls are ignored."""
        with self._lock:
            self.closed = True
            for request_id in sorted(self._open):
                self._tell_abort(request_id, reason)
            self._open.clear()
            self._failed.clear()

    def _tell_abort(self, request_id: str, reason: str) -> None:
        try:
            with self.sink_lock:
                self.sink.on_abort(request_id, reason)
        except Exception:  # noqa: BLE001 - an abort is best effort; the receiver's deadline backs it
            logger.exception("the KV sink failed aborting %r", request_id)


def _as_transfer_error(exc: Exception, what: str) -> TransferError:
    if isinstance(exc, TransferError):
        return exc
    logger.exception(what)
    return TransferError(f"{what}: {exc!r}")
