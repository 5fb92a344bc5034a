"""Errors of the KV-transfer layer. Every one marks the transfer failed; the cluster may retry the
request. Errors cross process boundaries by name (`error_from_wire`), keeping their class."""

from __future__ import annotations

from engine.errors import PDServeError


class TransferError(PDServeError, RuntimeError):
    """A KV transfer failed; the request's blocks were released on the side that raised it."""


class FrameError(TransferError, ValueError):
    """A frame is malformed; nothing of it was written into the KV cache. `request_id` is the
    request the frame names, when its header was readable that far (None otherwise)."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class TruncatedFrameError(FrameError):
    """Fewer bytes arrived than the frame declares."""


class ChecksumMismatchError(FrameError):
    """The payload's checksum differs from the one in the header: corrupted on the way."""


class UnsupportedVersionError(FrameError):
    """The frame was written by an incompatible pdserve (another wire format version)."""


class UnknownCodecError(FrameError):
    """The frame names a codec or lossless stage this side does not have."""


class LayoutMismatchError(FrameError):
    """Block size, KV heads, head dim, dtype, layers or block count differ between the two sides."""


class FingerprintMismatchError(LayoutMismatchError):
    """The frame comes from a different model or cache layout."""


class FrameTooLargeError(FrameError):
    """The frame is larger than this side accepts."""


class LayerSequenceError(TransferError):
    """A layer arrived twice, or the transfer ended with layers missing."""


class UnknownTransferError(TransferError, KeyError):
    """No reservation exists for the request (never made, already finished, expired or aborted)."""


class ReservationError(TransferError):
    """The decode side has no room for the request's KV now; retry later or elsewhere."""


class TransferAbortedError(TransferError):
    """One side aborted the transfer."""


class TransferTimeoutError(TransferError, TimeoutError):
    """The transfer did not complete before its deadline or lease expired."""


class PeerDisconnectedError(TransferError, ConnectionError):
    """The other side went away mid-transfer."""


class UnauthenticatedError(TransferError, PermissionError):
    """The peer did not present the shared secret token."""


_BY_NAME = {
    cls.__name__: cls
    for cls in (
        TransferError,
        FrameError,
        TruncatedFrameError,
        ChecksumMismatchError,
        UnsupportedVersionError,
        UnknownCodecError,
        LayoutMismatchError,
        FingerprintMismatchError,
        FrameTooLargeError,
        LayerSequenceError,
        UnknownTransferError,
        ReservationError,
        TransferAbortedError,
        TransferTimeoutError,
        PeerDisconnectedError,
        UnauthenticatedError,
    )
}


def error_to_wire(exc: BaseException) -> tuple[str, str]:
    """(class name, message) of an error, for a transport to carry back to the sender."""
    if not isinstance(exc, TransferError):  # not ours: say what it was
        return "TransferError", repr(exc)
    name = type(exc).__name__ if type(exc).__name__ in _BY_NAME else "TransferError"
    return name, str(exc.args[0]) if exc.args else str(exc)


def error_from_wire(name: str, message: str) -> TransferError:
    """The TransferError a peer reported, rebuilt with its own class (TransferError if unknown)."""
    return _BY_NAME.get(name, TransferError)(message)


def as_transfer_error(exc: BaseException) -> TransferError:
    """An error from another process (a rank's service), as the TransferError a worker reports."""
    if isinstance(exc, TransferError):
        return exc
    if isinstance(exc, TimeoutError):
        return TransferTimeoutError(str(exc))
    return error_from_wire(*error_to_wire(exc))
