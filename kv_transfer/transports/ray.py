"""Baseline transport through Ray's object store. Kept thin on purpose: the other transports are
measured against it.

    sender process                     mailbox actor (named)              receiver process (RayServer)
    send: ray.put((header, payload))
          post.remote(frame, [ref]) ──► queue of messages (refs only) ──► take() ─► ray.get(ref) (no copy)
    end:  end.remote(request, n) ─────► queued, waits for the answer       ─► SinkEndpoint ─► sink
          ray.get(posts + end) ◄─────── None | (class name, message) ◄───── answer.remote(request, error)

The sink stays in the receiving process, like every other transport's: the actor is only a
mailbox holding ObjectRefs, so the payload bytes go once into the object store (ray.put) and are
read from it in place. Posts are pipelined (send does not wait); end waits for them and for the
receiver's answer. The mailbox is an async actor, which may run calls out of order, so every
message carries its sender's sequence number and the mailbox queues them in that order.

Address: "ray://<namespace>/<actor name>" (a pdserve KV address, not a Ray Client address). Needs
ray.init() done by the caller. A sender that dies is not detected (its open requests are aborted
only when the server closes).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
import warnings

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from kv_transfer.errors import (
    PeerDisconnectedError,
    TransferError,
    TransferTimeoutError,
    error_from_wire,
    error_to_wire,
)
from kv_transfer.frame import peek_request_id
from kv_transfer.sink_endpoint import SinkEndpoint
from kv_transfer.transport import Connection, Frame, FrameSink, TransportServer

logger = logging.getLogger(__name__)

SCHEME = "ray://"
DEFAULT_NAMESPACE = "pdserve"
_CLOSED = ("PeerDisconnectedError", "the KV transfer server closed")


class Mailbox:
    """The actor's body: messages posted by senders, queued in each sender's order until the
    receiving process takes them, and the receiver's answers to end(). Holds refs, never bytes."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._next: dict[str, int] = {}  # sender -> sequence number it queues next
        self._held: dict[str, dict[int, list]] = {}  # sender -> messages that arrived early
        self._answers: dict[str, asyncio.Future] = {}  # request -> its end()'s answer
        self._closed = False

    async def post(self, sender: str, seq: int, message: list) -> None:
        held = self._held.setdefault(sender, {})
        held[seq] = message
        seq = self._next.get(sender, 0)
        while seq in held:
            self._queue.put_nowait(held.pop(seq))
            seq += 1
        self._next[sender] = seq

    async def end(self, sender: str, seq: int, request_id: str, num_frames: int) -> tuple[str, str] | None:
        if self._closed:
            return _CLOSED
        answer = self._answers[request_id] = asyncio.get_running_loop().create_future()
        await self.post(sender, seq, ["end", request_id, num_frames])
        return await answer

    async def take(self) -> list[list] | None:
        """Every queued message (waits for one); None once the server closes."""
        batch = [await self._queue.get()]
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return None if self._closed else batch

    async def answer(self, request_id: str, error: tuple[str, str] | None) -> None:
        answer = self._answers.pop(request_id, None)
        if answer is not None and not answer.done():
            answer.set_result(error)

    async def close(self) -> None:
        self._closed = True
        for answer in self._answers.values():
            if not answer.done():
                answer.set_result(_CLOSED)
        self._answers.clear()
        self._queue.put_nowait(["closed"])


def _frame_from(ref: ray.ObjectRef) -> Frame:
    """The frame behind an object reference, read in place from the object store."""
    try:
        header, payload = ray.get(ref)
    except RayError as exc:
        raise PeerDisconnectedError(f"a KV frame was lost in the object store: {exc}") from exc
    with warnings.catch_warnings():  # object-store arrays are read-only; sinks only read them
        warnings.simplefilter("ignore", UserWarning)
        return Frame(header, torch.from_numpy(payload))


_MailboxActor = ray.remote(num_cpus=0, max_restarts=0)(Mailbox)


class RayServer(TransportServer):
    """Starts a named mailbox actor and a thread that takes its messages and calls the sink (one
    call at a time)."""

    def __init__(self, sink: FrameSink, name: str | None = None, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.name = name or f"pdserve-kv-{uuid.uuid4().hex[:12]}"
        self.namespace = namespace
        self.endpoint = SinkEndpoint(sink)
        self.mailbox = _MailboxActor.options(name=self.name, namespace=namespace).remote()
        ray.get(self.mailbox.__ray_ready__.remote())
        self._thread = threading.Thread(target=self._deliver, name="ray-kv-deliver", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{SCHEME}{self.namespace}/{self.name}"

    def _deliver(self) -> None:
        while True:
            try:
                batch = ray.get(self.mailbox.take.remote())
            except RayError:
                batch = None
            if batch is None:
                break
            for kind, request_id, arg in batch:
                if kind == "frame":
                    self.endpoint.frame(request_id, lambda ref=arg[0]: _frame_from(ref))
                elif kind == "end":
                    error = self.endpoint.end(request_id, arg)
                    self.mailbox.answer.remote(request_id, None if error is None else error_to_wire(error))
                elif kind == "abort":
                    self.endpoint.abort(request_id, arg)
        self.endpoint.abort_open("server closed")

    def close(self) -> None:
        """Answer pending end()s with PeerDisconnectedError, abort open requests, kill the actor."""
        try:
            ray.get(self.mailbox.close.remote())
        except RayError:
            logger.debug("the KV mailbox actor was already gone")
        self._thread.join()
        ray.kill(self.mailbox, no_restart=True)


def _lookup(address: str) -> ray.actor.ActorHandle:
    if not address.startswith(SCHEME) or "/" not in address[len(SCHEME) :]:
        raise ValueError(f"not a Ray KV transfer address: {address!r} (expected {SCHEME}namespace/name)")
    namespace, name = address[len(SCHEME) :].split("/", 1)
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError as exc:
        raise PeerDisconnectedError(f"no KV transfer actor at {address!r}") from exc


class RayConnection(Connection):
    """The sending side: `address_or_handle` is a RayServer's address or its mailbox actor handle."""

    def __init__(self, address_or_handle: str | ray.actor.ActorHandle) -> None:
        if isinstance(address_or_handle, str):
            self._mailbox = _lookup(address_or_handle)
        else:
            self._mailbox = address_or_handle
        self._sender = uuid.uuid4().hex
        self._seq = itertools.count()
        self._posts: dict[str, list[ray.ObjectRef]] = {}  # request -> its posts' futures

    def send(self, frame: Frame) -> None:
        request_id = peek_request_id(frame.header) or ""
        ref = ray.put((frame.header, frame.payload.reshape(-1).cpu().numpy()))
        message = ["frame", request_id, [ref]]  # nested: the mailbox keeps the ref, not the bytes
        post = self._mailbox.post.remote(self._sender, next(self._seq), message)
        self._posts.setdefault(request_id, []).append(post)

    def end(self, request_id: str, num_frames: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        futures = self._posts.pop(request_id, [])
        if timeout <= 0:
            raise TransferTimeoutError(f"transfer of {request_id!r} ran past its deadline")
        futures.append(self._mailbox.end.remote(self._sender, next(self._seq), request_id, num_frames))
        try:
            error = ray.get(futures, timeout=max(deadline - time.monotonic(), 0.0))[-1]
        except GetTimeoutError as exc:
            raise TransferTimeoutError(
                f"the receiver did not acknowledge {request_id!r} within {timeout:g} s"
            ) from exc
        except RayActorError as exc:
            raise PeerDisconnectedError(f"the KV transfer server went away: {exc}") from exc
        except RayError as exc:
            raise TransferError(f"the KV transfer of {request_id!r} failed in Ray: {exc}") from exc
        if error is not None:
            raise error_from_wire(*error)

    def abort(self, request_id: str, reason: str) -> None:
        self._posts.pop(request_id, None)
        self._mailbox.post.remote(self._sender, next(self._seq), ["abort", request_id, reason])

    def close(self) -> None:
        self._posts.clear()
