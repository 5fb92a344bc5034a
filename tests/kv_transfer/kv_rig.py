"""Test helpers: a two-sided KV-transfer rig (a prefill cache and a decode cache with their
allocators, a KVReceiver behind the local transport, KVSenders connected to it) and test wires."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockAllocator
from kv_transfer.codecs import CodecSpec
from kv_transfer.frame import FORMAT_VERSION, FrameHeader, payload_checksum
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.transport import Connection, Frame
from kv_transfer.transports.local import LocalConnection, LocalServer

LAYERS, BLOCK, HEADS, DIM = 4, 16, 2, 32


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    src: torch.Tensor
    dst: torch.Tensor
    layout: KVLayout
    prefill_blocks: BlockAllocator
    decode_blocks: BlockAllocator
    receiver: KVReceiver
    server: LocalServer
    clock: FakeClock
    reserved: dict[str, list[int]] = field(default_factory=dict)  # the decode blocks of each request

    def sender(
        self, codec: str | CodecSpec = "none", connection: Connection | None = None, **kwargs
    ) -> KVSender:
        kwargs.setdefault("clock", self.clock)
        spec = codec if isinstance(codec, CodecSpec) else CodecSpec(codec)
        sender = KVSender(self.src, self.layout, self.prefill_blocks, spec, **kwargs)
        self.connection = connection or LocalConnection(self.server.address)
        return sender

    def start(self, sender: KVSender, request_id: str = "r1", num_tokens: int = 40) -> list[int]:
        blocks = self.prefill_blocks.allocate(-(-num_tokens // BLOCK))
        self.reserved[request_id] = self.receiver.reserve(request_id, num_tokens)
        sender.start(request_id, blocks, self.connection)
        return blocks

    def assert_nothing_held(self) -> None:
        assert self.prefill_blocks.num_free_blocks == self.prefill_blocks.num_blocks
        self.assert_nothing_held_on_decode_side()

    def assert_nothing_held_on_decode_side(self) -> None:
        assert self.decode_blocks.num_free_blocks == self.decode_blocks.num_blocks
        assert self.receiver.num_reserved_blocks == 0


def make_rig(layout: KVLayout | None = None, **receiver_kwargs) -> Rig:
    layout = layout or KVLayout(LAYERS, BLOCK, HEADS, DIM, "float32", "test-model")
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(LAYERS, 2, 16, BLOCK, HEADS, DIM, generator=gen)
    dst = torch.zeros(layout.num_layers, 2, 24, layout.block_size, layout.num_kv_heads, layout.head_dim)
    clock = FakeClock()
    decode_blocks = BlockAllocator(24)
    receiver = KVReceiver(dst, layout, decode_blocks, clock=clock, **receiver_kwargs)
    return Rig(src, dst, layout, BlockAllocator(16), decode_blocks, receiver, LocalServer(receiver), clock)


class RecordingConnection(Connection):
    """Keeps frames instead of sending them, so a test can replay, reorder or corrupt them."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.aborted: list[str] = []

    def send(self, frame: Frame) -> None:
        self.frames.append(Frame(frame.header, frame.payload.clone()))

    def end(self, request_id: str, num_frames: int, timeout: float) -> None:
        pass

    def abort(self, request_id: str, reason: str) -> None:
        self.aborted.append(request_id)

    def close(self) -> None:
        pass


class TamperingConnection(LocalConnection):
    """The local transport with a faulty wire: `mutate` rewrites the first frame it carries."""

    def __init__(self, address: str, mutate) -> None:
        super().__init__(address)
        self.mutate = mutate
        self.sent = 0

    def send(self, frame: Frame) -> None:
        self.sent += 1
        super().send(self.mutate(frame) if self.sent == 1 else frame)


def opaque_frame(request_id: str, payload: torch.Tensor, layer: int = 0) -> Frame:
    """A well-formed frame around arbitrary bytes, for transport tests: its header carries the
    request, the layer and a checksum of the payload; nothing else in it is looked at."""
    host = payload.cpu()
    header = FrameHeader(
        version=FORMAT_VERSION,
        request_id=request_id,
        fingerprint="test",
        layers=(layer, layer + 1),
        heads=(0, 2),
        block_ids=(0,),
        first_block=0,
        block_size=16,
        num_kv_heads=2,
        head_dim=8,
        dtype="float16",
        codec="none",
        scale_layout="",
        lossless="",
        raw_len=host.numel(),
        payload_len=host.numel(),
        checksum=payload_checksum(host, "xxh3_64"),
        checksum_alg="xxh3_64",
    )
    return Frame(header.encode(), payload)
