"""KV-transfer throughput: every transport and codec, beside the raw ceilings measured in the same run.

A Llama-3.1-8B-shaped cache (32 layers, 8 KV heads, head dim 128, bfloat16, 16-token blocks:
128 KiB of KV per token) lives in this process (the prefill side); a second process holds the
decode side's cache behind a KVReceiver and the transport's server. Each transfer moves one
request's KV (sender encode -> frames -> transport -> receiver checks + decode into its own
blocks -> ack); GB/s counts the original bfloat16 KV bytes over the wall time from the first
frame to the acknowledgement. Ceilings, same bytes, same run: one memcpy (`torch` copy_) for
`shm`, a raw TCP socket between two processes on loopback for `grpc`; `ray` is the baseline.
Row "shm one-copy" has the prefill cache in shared memory (what a CPU prefill worker in the
cluster uses): frames name the layers where they lie and the decode process copies the blocks
straight out of the sender's cache, one copy in all. Rows "<transport> frames" isolate the
transport: the same bytes as 32 MiB frames written into the transport's buffers (one copy, like
memcpy) and delivered to a sink that drops them, with no gather, checksum or decode.

    .venv/bin/python scripts/bench_transfer.py                      # all transports and codecs
    .venv/bin/python scripts/bench_transfer.py --tokens 2048 --transports shm --codecs none
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import socket
import statistics
import time
from collections.abc import Callable

import torch

from engine.block_manager import BlockAllocator, blocks_needed
from engine.kv_cache import shared_zeros
from kv_transfer.codecs import CodecSpec
from kv_transfer.frame import FORMAT_VERSION, FrameHeader
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.transport import Frame
from kv_transfer.transports import connect, serve

LAYOUT = KVLayout(32, 16, 8, 128, "bfloat16", "llama-3.1-8b-shape")
BYTES_PER_TOKEN = LAYOUT.bytes_per_block_layer // LAYOUT.block_size * LAYOUT.num_layers


def make_cache(num_blocks: int, fill: bool, shared: bool = False) -> torch.Tensor:
    shape = (LAYOUT.num_layers, 2, num_blocks, *LAYOUT.block_shape)
    cache = shared_zeros(shape, torch.bfloat16) if shared else torch.empty(shape, dtype=torch.bfloat16)
    if fill:
        gen = torch.Generator().manual_seed(0)
        for layer in cache:  # layer by layer: no float32 copy of the whole cache
            layer.copy_(torch.randn(layer.shape, generator=gen))
    else:
        cache.zero_()  # fault the pages in now, not during the first transfer
    return cache


# --- the decode side, in its own process --------------------------------------------------------


def decode_side(kind: str, pipe, num_blocks: int, options: dict) -> None:
    torch.set_num_threads(1)
    if kind == "ray":  # join the Ray cluster the benchmark process started
        import ray

        ray.init(address="auto", log_to_driver=False)
    cache = make_cache(num_blocks, fill=False)
    allocator = BlockAllocator(num_blocks)
    receiver = KVReceiver(cache, LAYOUT, allocator, timeout=600.0, max_frame_bytes=1 << 30)
    server = serve(kind, receiver, **options)
    null_server = serve(kind, NullSink(), **options)
    pipe.send((server.address, null_server.address))
    while True:
        command, *args = pipe.recv()
        if command == "reserve":
            pipe.send(receiver.reserve(args[0], args[1]))
        elif command == "take":
            allocator.free(receiver.take(args[0]))
            pipe.send(None)
        else:
            server.close()
            null_server.close()
            pipe.send(None)
            return


class NullSink:
    """Accepts every frame and does nothing with it: what the transport alone costs."""

    def on_frame(self, frame: Frame) -> None:
        pass

    def on_end(self, request_id: str, num_frames: int) -> None:
        pass

    def on_abort(self, request_id: str, reason: str) -> None:
        pass


class DecodeSide:
    def __init__(self, kind: str, num_blocks: int, options: dict) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.process = ctx.Process(target=decode_side, args=(kind, child, num_blocks, options), daemon=True)
        self.process.start()
        self.address, self.null_address = self.pipe.recv()

    def call(self, *command):
        self.pipe.send(command)
        return self.pipe.recv()

    def close(self) -> None:
        self.call("quit")
        self.process.join(timeout=30)


def _null_header(request_id: str, nbytes: int) -> bytes:
    """A well-formed header (transports may parse it); the NullSink checks nothing."""
    return FrameHeader(
        FORMAT_VERSION, request_id, LAYOUT.fingerprint, (0, 1), LAYOUT.heads, (0,), 0, *LAYOUT.block_shape,
        LAYOUT.dtype, "none", "", "", nbytes, nbytes, 0, "xxh3_64",
    ).encode()  # fmt: skip


def time_frames(connection, src: torch.Tensor, nbytes: int, repeats: int) -> list[float]:
    """Move `nbytes` of `src` as 32 MiB frames to a NullSink: the transport alone."""
    flat = src.view(-1).view(torch.uint8)[:nbytes]
    frame_bytes = 32 << 20
    times = []
    for i in range(repeats + 1):
        request_id = f"frames-{nbytes}-{i}-{time.monotonic_ns()}"
        start = time.perf_counter()
        num_frames = 0
        for offset in range(0, nbytes, frame_bytes):
            chunk = flat[offset : offset + frame_bytes]
            buffer = connection.payload_buffer(chunk.numel(), chunk.device)
            buffer.copy_(chunk)
            connection.send(Frame(_null_header(request_id, chunk.numel()), buffer))
            num_frames += 1
        connection.end(request_id, num_frames, 600.0)
        if i:
            times.append(time.perf_counter() - start)
    return times


def time_transfers(
    sender: KVSender, side: DecodeSide, connection, num_tokens: int, repeats: int
) -> list[float]:
    times = []
    blocks = list(range(blocks_needed(num_tokens, LAYOUT.block_size)))
    for i in range(repeats + 1):  # the first run warms up
        request_id = f"bench-{num_tokens}-{i}-{time.monotonic_ns()}"
        side.call("reserve", request_id, num_tokens)
        sender.allocator.incref(blocks)  # the sender frees one reference on the ack
        start = time.perf_counter()
        sender.start(request_id, blocks, connection)
        sender.finish(request_id, timeout=600.0)
        elapsed = time.perf_counter() - start
        side.call("take", request_id)
        if i:
            times.append(elapsed)
    return times


# --- raw ceilings -------------------------------------------------------------------------------


def memcpy_seconds(nbytes: int, repeats: int) -> list[float]:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        if i:
            times.append(time.perf_counter() - start)
    return times


def socket_sink(port_pipe, nbytes: int, repeats: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port_pipe.send(listener.getsockname()[1])
    conn, _ = listener.accept()
    buf = memoryview(bytearray(nbytes))
    for _ in range(repeats + 1):
        got = 0
        while got < nbytes:
            got += conn.recv_into(buf[got:], nbytes - got)
        conn.sendall(b"k")
    conn.close()


def socket_seconds(nbytes: int, repeats: int) -> list[float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=socket_sink, args=(child, nbytes, repeats), daemon=True)
    proc.start()
    sock = socket.create_connection(("127.0.0.1", parent.recv()))
    data = memoryview(torch.ones(nbytes, dtype=torch.uint8).numpy())
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        sock.sendall(data)
        sock.recv(1)
        if i:
            times.append(time.perf_counter() - start)
    sock.close()
    proc.join(timeout=30)
    return times


# --- the run ------------------------------------------------------------------------------------


def gbps(nbytes: int, times: list[float]) -> float:
    return nbytes / statistics.median(times) / 1e9


def run_transport(
    kind: str, codecs_: list[str], tokens: list[int], repeats: int, src: torch.Tensor, frames_too: bool = True
):
    options = {}
    side = DecodeSide(kind, src.shape[2], options)
    connection = connect(kind, side.address)
    results, frames = {}, {}
    try:
        null = connect(kind, side.null_address)
        for n in tokens if frames_too else ():
            frames["none", n] = gbps(
                n * BYTES_PER_TOKEN, time_frames(null, src, n * BYTES_PER_TOKEN, repeats)
            )
            print(f"  {kind:5s} frames {n:6d} tokens: {frames['none', n]:.2f} GB/s", flush=True)
        null.close()
        for codec in codecs_:
            allocator = BlockAllocator(src.shape[2])
            allocator.allocate(src.shape[2])  # the benchmark's request owns every block
            sender = KVSender(src, LAYOUT, allocator, CodecSpec(codec), lease_seconds=600.0)
            for n in tokens:
                results[codec, n] = gbps(
                    n * BYTES_PER_TOKEN, time_transfers(sender, side, connection, n, repeats)
                )
                print(f"  {kind:5s} {codec:5s} {n:6d} tokens: {results[codec, n]:.2f} GB/s", flush=True)
    finally:
        connection.close()
        side.close()
    return results, frames


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--transports", nargs="+", default=["shm", "grpc", "ray"])
    parser.add_argument("--codecs", nargs="+", default=["none", "fp8", "int8", "int4"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    src = make_cache(blocks_needed(max(args.tokens), LAYOUT.block_size), fill=True)
    when, cpus = time.strftime("%Y-%m-%d"), mp.cpu_count()
    print(f"# KV transfer — {when}, {platform.node()}, {cpus} CPUs, torch {torch.__version__}")
    ceilings: dict[str, Callable[[int, int], list[float]]] = {
        "memcpy": memcpy_seconds,
        "tcp socket": socket_seconds,
    }
    rows = {}
    for name, measure in ceilings.items():
        rows[name] = {
            ("none", n): gbps(n * BYTES_PER_TOKEN, measure(n * BYTES_PER_TOKEN, args.repeats))
            for n in args.tokens
        }
        print(f"  {name}: " + ", ".join(f"{rows[name]['none', n]:.2f} GB/s" for n in args.tokens), flush=True)
    if "ray" in args.transports:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for kind in args.transports:
        rows[kind], rows[f"{kind} frames"] = run_transport(kind, args.codecs, args.tokens, args.repeats, src)
        if kind == "shm" and "none" in args.codecs:
            shared = make_cache(src.shape[2], fill=True, shared=True)
            rows["shm one-copy"], _ = run_transport(kind, ["none"], args.tokens, args.repeats, shared, False)
            del shared

    print(
        "\n| path | codec | "
        + " | ".join(f"{n} tokens ({n * BYTES_PER_TOKEN / 2**20:.0f} MiB) GB/s" for n in args.tokens)
        + " |"
    )
    print("|---|---|" + "---:|" * len(args.tokens))
    for path, results in rows.items():
        for (codec, n), _ in sorted(results.items()):
            if n != args.tokens[0]:
                continue
            cells = " | ".join(f"{results[codec, m]:.2f}" for m in args.tokens)
            print(f"| {path} | {codec} | {cells} |")


if __name__ == "__main__":
    main()
