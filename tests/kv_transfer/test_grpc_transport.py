"""The gRPC KV transport over a real server and client on 127.0.0.1: chunking, ordering, errors by
class, deadlines, flow control, token and TLS, oversized frames, disconnects on either side."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
import torch
from kv_rig import opaque_frame

from kv_transfer.errors import (
    ChecksumMismatchError,
    FrameTooLargeError,
    PeerDisconnectedError,
    TransferError,
    TransferTimeoutError,
    UnauthenticatedError,
)
from kv_transfer.frame import MAGIC, PREFIX, decode_header, verify_payload
from kv_transfer.stubs import load as load_stubs
from kv_transfer.transport import Frame
from kv_transfer.transports.grpc import GrpcConnection, GrpcServer

CHUNK = 4096
WAIT = 10.0  # seconds; generous bound for events that come within milliseconds


def make_frame(request_id: str, nbytes: int, seed: int = 0) -> Frame:
    generator = torch.Generator().manual_seed(seed)
    payload = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
    return opaque_frame(request_id, payload, layer=seed)


class RecordingSink:
    """Records what the server delivers. fail_on[(request, i)]: raise that error for the request's
    i-th frame; end_gate: on_end waits for it to be set; frame_gate: on_frame waits for it."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes, bytes]] = []  # (request id, header, payload)
        self.ends: list[tuple[str, int, int]] = []  # (request id, num_frames, frames of it seen by then)
        self.aborts: list[tuple[str, str]] = []
        self.fail_on: dict[tuple[str, int], Exception] = {}
        self.end_gate: threading.Event | None = None
        self.frame_gate: threading.Event | None = None
        self.received: dict[str, int] = {}  # frames that reached on_frame, per request
        self.changed = threading.Condition()

    def on_frame(self, frame: Frame) -> None:
        header = decode_header(frame.header)
        verify_payload(header, frame.payload)
        assert frame.payload.dtype == torch.uint8 and frame.payload.device.type == "cpu"
        with self.changed:
            index = self.received.get(header.request_id, 0)
            self.received[header.request_id] = index + 1
            self.changed.notify_all()
        if self.frame_gate is not None:
            assert self.frame_gate.wait(WAIT)
        error = self.fail_on.get((header.request_id, index))
        if error is not None:
            raise error
        self.frames.append((header.request_id, frame.header, frame.payload.numpy().tobytes()))

    def on_end(self, request_id: str, num_frames: int) -> None:
        if self.end_gate is not None:
            assert self.end_gate.wait(WAIT)
        self.ends.append((request_id, num_frames, sum(1 for f in self.frames if f[0] == request_id)))

    def on_abort(self, request_id: str, reason: str) -> None:
        with self.changed:
            self.aborts.append((request_id, reason))
            self.changed.notify_all()

    def wait_for_abort(self, request_id: str) -> str:
        with self.changed:
            assert self.changed.wait_for(lambda: any(r == request_id for r, _ in self.aborts), WAIT)
            return next(reason for r, reason in self.aborts if r == request_id)

    def wait_for_frames(self, request_id: str, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.received.get(request_id, 0) >= count, WAIT)

    def payloads(self, request_id: str) -> list[bytes]:
        return [payload for r, _, payload in self.frames if r == request_id]


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def serve(sink):
    """serve(**kwargs) -> a GrpcServer on sink; closed after the test."""
    servers: list[GrpcServer] = []

    def start(**kwargs) -> GrpcServer:
        servers.append(GrpcServer(sink, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def connect():
    """connect(address, **kwargs) -> a GrpcConnection with small chunks; closed after the test."""
    connections: list[GrpcConnection] = []

    def open_connection(address: str, **kwargs) -> GrpcConnection:
        kwargs.setdefault("chunk_bytes", CHUNK)
        connections.append(GrpcConnection(address, **kwargs))
        return connections[-1]

    yield open_connection
    for connection in connections:
        connection.close()


def payload_bytes(frame: Frame) -> bytes:
    return frame.payload.numpy().tobytes()


def test_frames_of_every_size_arrive_identical_and_in_order(sink, serve, connect):
    conn = connect(serve().address)
    sizes = [0, 1, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, 50_000]
    frames = [make_frame("r", n, seed=i) for i, n in enumerate(sizes)]
    for frame in frames:
        conn.send(frame)
    conn.end("r", len(frames), timeout=WAIT)
    assert [header for _, header, _ in sink.frames] == [f.header for f in frames]
    assert sink.payloads("r") == [payload_bytes(f) for f in frames]
    assert sink.ends == [("r", len(frames), len(frames))]  # acked only after every frame was delivered


def test_two_requests_interleaved_on_one_connection(sink, serve, connect):
    conn = connect(serve().address)
    a = [make_frame("a", 3 * CHUNK + i, seed=i) for i in range(4)]
    b = [make_frame("b", CHUNK // 2 + i, seed=10 + i) for i in range(4)]
    for fa, fb in zip(a, b, strict=True):
        conn.send(fa)
        conn.send(fb)
    conn.end("b", len(b), timeout=WAIT)
    conn.end("a", len(a), timeout=WAIT)
    assert sink.payloads("a") == [payload_bytes(f) for f in a]
    assert sink.payloads("b") == [payload_bytes(f) for f in b]
    assert sink.ends == [("b", 4, 4), ("a", 4, 4)]


@pytest.mark.parametrize(
    ("raised", "expected"),
    [(ChecksumMismatchError("bad bytes"), ChecksumMismatchError), (RuntimeError("sink bug"), TransferError)],
)
def test_sink_error_surfaces_from_its_requests_end_only(sink, serve, connect, raised, expected):
    sink.fail_on[("bad", 1)] = raised
    conn = connect(serve().address)
    for i in range(3):
        conn.send(make_frame("bad", 2 * CHUNK, seed=i))
        conn.send(make_frame("good", 2 * CHUNK, seed=i))
    with pytest.raises(expected) as info:
        conn.end("bad", 3, timeout=WAIT)
    assert type(info.value) is expected
    assert str(raised) in str(info.value)
    conn.end("good", 3, timeout=WAIT)
    assert len(sink.payloads("bad")) == 1  # frame 1 failed; frame 2 was dropped unread
    assert sink.received["bad"] == 2
    assert [e[0] for e in sink.ends] == ["good"]  # on_end is not called for a failed request
    conn.send(make_frame("next", 10))  # the stream still serves
    conn.end("next", 1, timeout=WAIT)


def test_end_times_out_when_the_ack_is_late(sink, serve, connect):
    sink.end_gate = threading.Event()
    conn = connect(serve().address)
    conn.send(make_frame("slow", 100))
    with pytest.raises(TransferTimeoutError):
        conn.end("slow", 1, timeout=0.2)
    sink.end_gate.set()
    conn.send(make_frame("after", 100))
    conn.end("after", 1, timeout=WAIT)  # the late ack of "slow" is ignored
    assert [e[0] for e in sink.ends] == ["slow", "after"]


def test_send_blocks_while_the_window_is_full(sink, serve, connect):
    sink.frame_gate = threading.Event()
    conn = connect(serve().address, chunk_bytes=1 << 20, window=2 << 20)
    frame = make_frame("r", 1 << 20)
    num_frames = 64  # far more than the window, the HTTP/2 windows and the socket buffers hold
    sender = threading.Thread(target=lambda: [conn.send(frame) for _ in range(num_frames)])
    sender.start()
    sender.join(timeout=0.5)
    assert sender.is_alive()  # held back: the receiver takes nothing while its sink is stuck
    sink.frame_gate.set()
    sender.join(WAIT)
    assert not sender.is_alive()
    conn.end("r", num_frames, timeout=WAIT)
    assert len(sink.payloads("r")) == num_frames


def test_payload_buffer_is_reused_once_its_frame_is_sent(sink, serve, connect):
    conn = connect(serve().address)
    frames = [make_frame("r", 10_000, seed=i) for i in range(3)]
    addresses = []
    for i, frame in enumerate(frames):
        buffer = conn.payload_buffer(10_000, torch.device("cpu"))
        buffer.copy_(frame.payload)  # the codec writes the payload here
        conn.send(Frame(frame.header, buffer))
        conn.end("r", i + 1, timeout=WAIT)  # serialized, so the buffer is free again
        addresses.append(buffer.data_ptr())
    assert addresses[0] == addresses[1] == addresses[2]
    assert sink.payloads("r") == [payload_bytes(f) for f in frames]
    unsent = conn.payload_buffer(10_000, torch.device("cpu"))  # its encode failed
    conn.release_buffer(unsent)
    assert conn.payload_buffer(5_000, torch.device("cpu")).data_ptr() == unsent.data_ptr()


def test_abort_reaches_the_sink(sink, serve, connect):
    conn = connect(serve().address)
    conn.send(make_frame("r", 100))
    conn.abort("r", "cancelled by the scheduler")
    assert sink.wait_for_abort("r") == "cancelled by the scheduler"
    conn.send(make_frame("other", 100))
    conn.end("other", 1, timeout=WAIT)
    assert [r for r, _ in sink.aborts] == ["r"]


@pytest.mark.parametrize("token", [None, "wrong"])
def test_server_with_token_refuses_a_peer_without_it(sink, serve, connect, token):
    server = serve(token="s3cret")
    with pytest.raises(UnauthenticatedError):
        connect(server.address, token=token)
    conn = connect(server.address, token="s3cret")
    conn.send(make_frame("r", 100))
    conn.end("r", 1, timeout=WAIT)
    assert sink.payloads("r") == [payload_bytes(make_frame("r", 100))]


def self_signed_certificate(directory: Path) -> tuple[bytes, bytes]:
    """(private key PEM, certificate PEM) for 127.0.0.1 / localhost."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    if shutil.which("openssl"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"]
            + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True,
            capture_output=True,
        )
        return key.read_bytes(), cert.read_bytes()
    pytest.importorskip("cryptography", reason="needs the openssl command or the cryptography package")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def test_tls_round_trip(sink, serve, connect, tmp_path):
    key, cert = self_signed_certificate(tmp_path)
    server = serve(tls=(key, cert), token="s3cret")
    conn = connect(server.address, tls=cert, token="s3cret")
    frames = [make_frame("r", 3 * CHUNK + 1, seed=i) for i in range(3)]
    for frame in frames:
        conn.send(frame)
    conn.end("r", 3, timeout=WAIT)
    assert sink.payloads("r") == [payload_bytes(f) for f in frames]
    with pytest.raises(PeerDisconnectedError):  # plain TCP to a TLS server
        connect(server.address, token="s3cret", connect_timeout=WAIT)


def test_oversized_frame_is_refused_and_the_server_keeps_serving(sink, serve, connect):
    server = serve(max_frame_bytes=16 * CHUNK)
    conn = connect(server.address)
    conn.send(make_frame("big", 3 * CHUNK))
    conn.send(make_frame("big", 40 * CHUNK))
    conn.send(make_frame("small", 2 * CHUNK))
    with pytest.raises(FrameTooLargeError):
        conn.end("big", 2, timeout=WAIT)
    conn.end("small", 1, timeout=WAIT)
    assert len(sink.payloads("big")) == 1 and len(sink.payloads("small")) == 1
    assert sink.aborts == [("big", sink.aborts[0][1])]  # the sink frees what it reserved for "big"
    assert "FrameTooLargeError" in sink.aborts[0][1]


def test_a_plain_protobuf_peer_gets_frame_errors_by_class(sink, serve):
    pb2, _ = load_stubs("kv_transfer")
    good, cut = make_frame("ok", 5000), make_frame("cut", 5000)
    data = payload_bytes(good)

    def chunk(request_id: str, seq: int, data: bytes, header: bytes = b"", last: bool = False):
        return pb2.KVMessage(
            chunk=pb2.FrameChunk(request_id=request_id, frame_seq=seq, header=header, data=data, last=last)
        )

    messages = [
        chunk("bad", 0, b"x", header=PREFIX.pack(MAGIC, 3) + b"\xc1\xc1\xc1", last=True),  # not msgpack
        chunk("cut", 1, payload_bytes(cut)[:100], header=cut.header),  # its last chunk never comes
        pb2.KVMessage(end=pb2.End(request_id="cut", num_frames=1)),
        pb2.KVMessage(end=pb2.End(request_id="bad", num_frames=1)),
        chunk("ok", 2, data[:3000], header=good.header),
        chunk("ok", 2, data[3000:], last=True),
        pb2.KVMessage(end=pb2.End(request_id="ok", num_frames=1)),
    ]
    with grpc.insecure_channel(serve().address) as channel:
        stream = channel.stream_stream(
            "/pdserve.kv.KVTransfer/Stream",
            request_serializer=pb2.KVMessage.SerializeToString,
            response_deserializer=pb2.KVReply.FromString,
        )
        replies = list(stream(iter(messages), timeout=WAIT))
    assert [r.WhichOneof("kind") for r in replies] == ["ready", "error", "error", "ack"]
    assert [(r.error.request_id, r.error.error_class) for r in replies[1:3]] == [
        ("cut", "TruncatedFrameError"),
        ("bad", "FrameError"),
    ]
    assert sink.payloads("ok") == [data]
    assert [(r, reason.split(":")[0]) for r, reason in sink.aborts] == [
        ("bad", "FrameError"),
        ("cut", "TruncatedFrameError"),
    ]


def test_client_disconnect_aborts_the_requests_it_left_open(sink, serve, connect):
    conn = connect(serve().address)
    conn.send(make_frame("done", 100))
    conn.end("done", 1, timeout=WAIT)
    conn.send(make_frame("open", 2 * CHUNK, seed=1))
    conn.send(make_frame("open", 2 * CHUNK, seed=2))
    sink.wait_for_frames("open", 2)  # close() drops what is still queued; these are across already
    conn.close()
    assert sink.wait_for_abort("open") == "peer disconnected"
    assert [r for r, _ in sink.aborts] == ["open"]
    with pytest.raises(PeerDisconnectedError):
        conn.send(make_frame("open", 100))


def test_server_stopped_fails_end_with_peer_disconnected(sink, serve, connect):
    server = serve()
    conn = connect(server.address)
    conn.send(make_frame("r", 2 * CHUNK))
    sink.wait_for_frames("r", 1)
    server.close()
    with pytest.raises(PeerDisconnectedError):
        conn.end("r", 1, timeout=WAIT)
    assert sink.wait_for_abort("r") == "peer disconnected"


def test_connect_to_nothing_raises_peer_disconnected(connect):
    with pytest.raises(PeerDisconnectedError):
        connect("127.0.0.1:1", connect_timeout=WAIT)


def test_stubs_are_generated_with_a_private_import(tmp_path, monkeypatch):
    from kv_transfer import stubs

    monkeypatch.setattr(stubs, "GEN_DIR", tmp_path / "gen")
    stubs._generate("kv_transfer")
    generated = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert generated == ["kv_transfer_pb2.py", "kv_transfer_pb2_grpc.py"]
    grpc_stub = (tmp_path / "gen" / "kv_transfer_pb2_grpc.py").read_text()
    assert "import _pdserve_stubs_kv_transfer_pb2 as" in grpc_stub  # never the top-level `proto`
    source = stubs.PROTO_DIR / "kv_transfer.proto"
    outputs = list((tmp_path / "gen").iterdir())
    assert stubs._is_fresh(source, outputs)
    assert not stubs._is_fresh(source, [*outputs, tmp_path / "gen" / "missing_pb2.py"])
