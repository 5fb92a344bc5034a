"""What every transport provides. Transports move frames; they know nothing of codecs or layouts.

    sender process                                   receiver process
    KVSender ── Connection.send(frame) ──────────►  TransportServer ──► FrameSink.on_frame(frame)
             ── Connection.end(request, n) ──────►                  ──► FrameSink.on_end(request, n)
             ◄───────────── ack / error ──────────                  ◄── returns / raises TransferError
             ── Connection.abort(request) ───────►                  ──► FrameSink.on_abort(request)

Per connection, frames of one request arrive in the order they were sent; requests may interleave.
`send` may return before the receiver has the frame (transports pipeline); an error the receiver
raised for any frame of a request surfaces, with its class, from that request's `end`. After
`end` returns, the receiver has decoded every frame into its blocks and acknowledged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Frame:
    """One frame: the encoded header (kv_transfer.frame) and the payload bytes it describes."""

    header: bytes
    payload: torch.Tensor  # uint8 [payload_len], contiguous, on the CPU or a GPU

    @property
    def nbytes(self) -> int:
        return len(self.header) + self.payload.numel()


class FrameSink(Protocol):
    """The receiving side (KVReceiver). A transport server calls these; what they raise goes back to
    the sender. Calls for one request never overlap. A frame's payload may be a view of the
    transport's staging memory: it is valid only until on_frame returns."""

    def on_frame(self, frame: Frame) -> None: ...

    def on_end(self, request_id: str, num_frames: int) -> None: ...

    def on_abort(self, request_id: str, reason: str) -> None: ...


class Connection(ABC):
    """The sending side's link to one receiver."""

    def payload_buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A uint8 buffer for the next frame's payload. Transports that stage frames in shared memory
        hand out their staging slot here, so the codec writes straight into it (no extra copy)."""
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def release_buffer(self, buffer: torch.Tensor) -> None:
        """Give back a buffer from payload_buffer that will not be sent (its encode failed). Plain
        tensors need nothing; transports that lend staging slots take the slot back."""
        del buffer

    def by_reference(self, tensor: torch.Tensor) -> bool:
        """Whether a frame whose payload is a view of `tensor` (a sender's KV cache in shared
        memory, engine/kv_cache.py) can travel by reference: the receiver maps that memory once
        and reads the payload where it lies (the one-copy path). Most links copy: False."""
        del tensor
        return False

    @abstractmethod
    def send(self, frame: Frame) -> None:
        """Queue a frame for delivery; raises TransferError if the link is already broken."""

    @abstractmethod
    def end(self, request_id: str, num_frames: int, timeout: float) -> None:
        """Declare the request's frames complete and wait for the receiver's acknowledgement; raises
        the receiver's TransferError, TransferTimeoutError or PeerDisconnectedError."""

    @abstractmethod
    def abort(self, request_id: str, reason: str) -> None:
        """Tell the receiver to drop the request's transfer and free what it reserved (best effort)."""

    @abstractmethod
    def close(self) -> None:
        """Release the link; pending requests fail with PeerDisconnectedError on the far side."""


class TransportServer(ABC):
    """The receiving side's listener, delivering frames to one FrameSink."""

    @property
    @abstractmethod
    def address(self) -> str:
        """What a sender passes to `connect` to reach this server."""

    @abstractmethod
    def close(self) -> None:
        """Stop accepting; in-flight requests fail with PeerDisconnectedError on the sending side."""
