"""An engine's ranks beyond rank 0 as local processes, and the loop each one runs. The engine has
tp*pp ranks, rank g = stage*tp + t (engine/parallel/pipeline.py); with one stage:

    rank 0: the engine's own process                  rank r = 1 .. N-1: a spawned process
    schedule, prepare the step's inputs ──pipe──────> inputs
    forward  <──── all-reduce x 2 per layer ────────> forward (its heads, its MLP slice)
    logits, sample                                    nothing more: the hidden state is whole

and with several, the stages hand the hidden state of each micro-batch on, point to point, and
the last sends the logits back to rank 0.

Ranks 1..N-1 are processes this one spawns, or (given a `RankLauncher`: the cluster's Ray actors,
each on its own GPU and possibly another node) processes started elsewhere that connect back over
TCP; either way each gets a `RankStart` and the same loop runs in it.

Steps reach a rank through a pipe of its own, where it waits however long the engine idles;
torch.distributed (gloo on CPUs, NCCL on GPUs) carries only the all-reduces and hand-offs inside
a step, under a timeout, so a rank that dies fails the step (and the engine) instead of hanging
it. Before the first step every rank reports how many cache blocks its memory holds and all take
the smallest, so block ids mean the same on every rank. An engine may also give its ranks a
service to run beside their steps (engine/parallel/rank_service.py: the KV transfer of a
disaggregated instance), reached through a second pipe each.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import pickle
import socket
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Client, Connection, Listener
from typing import Protocol

import torch
import torch.distributed as dist

from engine.engine_config import EngineConfig
from engine.errors import PDServeError
from engine.kv_cache import num_blocks_for
from engine.model_loader import LoadedModel, load_model
from engine.model_runner import ModelRunner, Step
from engine.parallel.pipeline import PPStage, StageLinks
from engine.parallel.rank_service import RankServiceFactory, RankServices, serve_rank
from engine.parallel.tensor_parallel import TPShard, apply_tensor_parallel

COLLECTIVE_TIMEOUT = timedelta(seconds=120)  # one step's collectives; a dead rank fails it after this
START_TIMEOUT = 600.0  # seconds for every rank to load its shard
_STOP = b"stop"  # rank 0 -> rank r: no more steps (any other message is a pickled Step)


class RankFailedError(PDServeError, RuntimeError):
    """A rank of a tensor- or pipeline-parallel engine died or failed; the engine cannot step any more."""


@dataclass(frozen=True)
class RankPlace:
    """Where rank `rank` of an engine with `tp` x `pp` ranks sits."""

    rank: int
    tp: int
    pp: int

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @classmethod
    def of(cls, config: EngineConfig, rank: int) -> RankPlace:
        return cls(rank, config.tensor_parallel_size, config.pipeline_parallel_size)


@dataclass
class RankGroups:
    """A rank's process groups: `world` (every rank: the pipeline's hand-offs) and `tp` (its
    stage's ranks: the all-reduces; the world itself when there is one stage)."""

    world: dist.ProcessGroup
    tp: dist.ProcessGroup | None


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the same CPU, or the r-th GPU after the configured one."""
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


LOCAL_HOST = "127.0.0.1"


@dataclass(frozen=True)
class RankStart:
    """What rank `rank` needs to join its engine (picklable: it travels to the rank's process)."""

    config: EngineConfig
    rank: int
    store: tuple[str, int]  # rank 0's TCPStore
    threads: int
    service: RankServiceFactory | None = None
    device: str | None = None  # None: rank_device; "cuda:0" for a rank that sees only its own GPU
    connect_to: tuple[str, int] | None = None  # rank 0's listener, for a rank started elsewhere
    authkey: bytes = b""

    @property
    def host(self) -> str:
        """This rank's address for the collectives: loopback beside rank 0, else the interface
        that routes to rank 0."""
        if self.connect_to is None or self.connect_to[0] == LOCAL_HOST:
            return LOCAL_HOST
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # sends nothing
            probe.connect(self.connect_to)
            return probe.getsockname()[0]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device) if self.device else rank_device(self.config.torch_device, self.rank)


class RankHandle(Protocol):
    """Rank 0's view of a rank's process (a multiprocessing.Process satisfies it)."""

    name: str
    pid: int | None

    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...

    def kill(self) -> None: ...


class RankLauncher(Protocol):
    """Starts ranks beyond 0 somewhere else (the cluster's Ray actors, cluster/rank_actors.py);
    each runs `run_rank(start)` and connects back to `start.connect_to`."""

    host: str  # where those ranks reach this process

    def launch(self, start: RankStart) -> RankHandle: ...


def _group(device: torch.device, store: dist.Store, rank: int, size: int, host: str) -> dist.ProcessGroup:
    """A process group over `store`: gloo on CPUs (over `host`'s interface), NCCL on GPUs. A group
    object of its own, not torch.distributed's global default one, so several engines can live in
    one process."""
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, size)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = COLLECTIVE_TIMEOUT
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, size, options)


def connect_groups(
    config: EngineConfig,
    place: RankPlace,
    store: dist.Store,
    device: torch.device | None = None,
    host: str = LOCAL_HOST,
) -> RankGroups:
    """This rank's groups over `store` (each under a prefix of its own)."""
    device = device or rank_device(config.torch_device, place.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = _group(device, dist.PrefixStore("world", store), place.rank, place.tp * place.pp, host)
    if place.tp == 1:
        return RankGroups(world, None)
    if place.pp == 1:
        return RankGroups(world, world)
    tp_store = dist.PrefixStore(f"tp{place.stage}", store)
    return RankGroups(world, _group(device, tp_store, place.tp_rank, place.tp, host))


def _store(host: str, port: int, size: int, master: bool) -> dist.TCPStore:
    return dist.TCPStore(host, port, size, master, timedelta(seconds=START_TIMEOUT), wait_for_workers=False)


def load_rank(
    config: EngineConfig, place: RankPlace, groups: RankGroups, device: torch.device | None = None
) -> tuple[LoadedModel, int, StageLinks | None]:
    """The rank's shard of its stage (summing over its TP group), the cache blocks it can hold,
    and its pipeline links (None with one stage)."""
    device = device or rank_device(config.torch_device, place.rank)
    loaded = load_model(
        config.model,
        config.torch_dtype,
        device,
        seed=config.seed,
        tp=(place.tp_rank, place.tp),
        pp=(place.stage, place.pp),
    )
    if groups.tp is not None:
        apply_tensor_parallel(loaded.model, groups.tp)
    stage = PPStage(loaded.config, place.stage, place.pp)
    # Sized by the TP rank holding the most KV heads, so a stage's ranks agree without asking.
    largest = TPShard(stage.config, 0, place.tp).config
    links = StageLinks(groups.world, stage, place.tp_rank, place.tp) if place.pp > 1 else None
    return loaded, num_blocks_for(largest, config.cache, config.torch_dtype, device), links


def run_rank(
    start: RankStart, conn: Connection | None = None, service_conn: Connection | None = None
) -> None:
    """Rank r >= 1: connect back to rank 0 (when started elsewhere), join the groups, load its
    shard, start its service (if any), then run every step rank 0 sends until told to stop."""
    config, rank, service = start.config, start.rank, start.service
    if conn is None:  # started elsewhere: the two channels over TCP, each named by its first message
        conn = Client(start.connect_to, authkey=start.authkey)
        conn.send(("steps", rank))
        if service is not None:
            service_conn = Client(start.connect_to, authkey=start.authkey)
            service_conn.send(("service", rank))
    service_thread = None
    try:
        torch.set_num_threads(start.threads)
        place = RankPlace.of(config, rank)
        device = start.torch_device
        store = _store(*start.store, place.tp * place.pp, master=False)
        groups = connect_groups(config, place, store, device, start.host)
        loaded, capacity, links = load_rank(config, place, groups, device)
        conn.send(("capacity", capacity))
        num_blocks = conn.recv()
        runner = ModelRunner(
            loaded.model, config.cache, device, config.onednn_linear, num_blocks=num_blocks, links=links
        )
        if service is not None:
            service_thread = threading.Thread(
                target=serve_rank,
                args=(service, place, runner, loaded.config, service_conn),
                name="rank-service",
                daemon=True,
            )
            service_thread.start()
        conn.send(("ready", None))
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"))
        return
    try:
        while (message := conn.recv_bytes()) != _STOP:
            runner.run_step(pickle.loads(message))
    except (EOFError, OSError):
        pass  # rank 0 went away
    finally:
        if service_thread is not None:  # let the service close what it opened (servers, segments)
            service_conn.close()
            service_thread.join(timeout=10)


def _own_device(start: RankStart) -> str | None:
    """A rank started elsewhere sees only its own GPU (the launcher gives it one)."""
    return "cuda:0" if start.config.torch_device.type == "cuda" else None


def _accept(
    listener: Listener, expected: int, handles: list[RankHandle]
) -> dict[tuple[str, int], Connection]:
    """The ranks' connections by (channel, rank), within START_TIMEOUT; a rank that dies first fails it."""
    channels: dict[tuple[str, int], Connection] = {}
    errors: list[BaseException] = []

    def accept() -> None:
        try:
            while len(channels) < expected:
                conn = listener.accept()
                channel, rank = conn.recv()
                channels[channel, rank] = conn
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=accept, name="rank-accept", daemon=True)
    thread.start()
    waited = 0.0
    while thread.is_alive() and waited < START_TIMEOUT:
        thread.join(1.0)
        waited += 1.0
        dead = [h.name for h in handles if not h.is_alive()]
        if dead:
            raise RankFailedError(f"rank {', '.join(dead)} exited before connecting")
    if errors or len(channels) < expected:
        for conn in channels.values():
            conn.close()
        why = f": {errors[0]!r}" if errors else f" within {START_TIMEOUT:g} s"
        raise RankFailedError(f"{expected - len(channels)} rank connection(s) did not arrive{why}")
    return channels


class ParallelRanks:
    """Rank 0's handle on ranks 1 .. N-1: starts them, joins their groups, agrees on the cache
    size, and hands each step to every rank (`send`, the model runner's fan-out). `groups` are
    rank 0's own members of the groups."""

    def __init__(
        self,
        config: EngineConfig,
        service: RankServiceFactory | None = None,
        launcher: RankLauncher | None = None,
    ) -> None:
        """`service`: built in every rank beyond 0 and reachable as `services` once the cache
        size is agreed. `launcher`: who starts ranks 1 .. N-1 (by default, processes spawned here)."""
        self.size = config.tensor_parallel_size * config.pipeline_parallel_size
        self.services: RankServices | None = None
        self._service = service
        self._service_conns: list[Connection] = []
        self.conns: list[Connection] = []
        self.processes: list[RankHandle] = []
        host = launcher.host if launcher is not None else LOCAL_HOST
        self._store = _store(host, 0, self.size, master=True)  # port 0: any free one, told to the ranks
        threads = max(1, torch.get_num_threads() // self.size)
        torch.set_num_threads(threads)  # a spawned rank shares this machine's cores
        start = RankStart(config, 0, (host, self._store.port), threads, service)
        try:
            if launcher is None:
                self._spawn(start)
            else:
                self._launch(start, launcher)
            self.groups = connect_groups(config, RankPlace.of(config, 0), self._store, host=host)
        except BaseException:
            self.close()
            raise

    def _spawn(self, start: RankStart) -> None:
        ctx = mp.get_context("spawn")
        for rank in range(1, self.size):
            ours, theirs = ctx.Pipe()
            service_ours, service_theirs = ctx.Pipe() if start.service is not None else (None, None)
            p = ctx.Process(
                target=run_rank,
                args=(dataclasses.replace(start, rank=rank), theirs, service_theirs),
                name=f"pdserve-rank{rank}",
                daemon=True,
            )
            p.start()
            theirs.close()
            if service_theirs is not None:
                service_theirs.close()
                self._service_conns.append(service_ours)
            self.conns.append(ours)
            self.processes.append(p)

    def _launch(self, start: RankStart, launcher: RankLauncher) -> None:
        """Ranks started by `launcher` connect back to a listener here, one connection per channel."""
        authkey = os.urandom(16)
        with Listener((launcher.host, 0), authkey=authkey) as listener:
            start = dataclasses.replace(
                start, connect_to=listener.address, authkey=authkey, device=_own_device(start)
            )
            for rank in range(1, self.size):
                self.processes.append(launcher.launch(dataclasses.replace(start, rank=rank)))
            expected = (self.size - 1) * (2 if start.service is not None else 1)
            channels = _accept(listener, expected, self.processes)
        self.conns = [channels["steps", rank] for rank in range(1, self.size)]
        if start.service is not None:
            self._service_conns = [channels["service", rank] for rank in range(1, self.size)]

    def _expect(self, conn: Connection, what: str) -> object:
        if not conn.poll(START_TIMEOUT):
            raise RankFailedError(f"a parallel rank did not report its {what} in {START_TIMEOUT:g} s")
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):
            raise RankFailedError("a parallel rank exited while starting") from None
        if kind == "error":
            raise RankFailedError(f"a parallel rank failed to start: {value}")
        if kind != what:
            raise RankFailedError(f"a parallel rank sent {kind!r} where {what!r} was due")
        return value

    def agree_num_blocks(self, own: int) -> int:
        """The smallest cache any rank can hold, sent to all of them; returns it."""
        try:
            num_blocks = min([own] + [int(self._expect(c, "capacity")) for c in self.conns])
            for conn in self.conns:
                conn.send(num_blocks)
            for conn in self.conns:
                self._expect(conn, "ready")
            if self._service is not None:
                self.services = RankServices(self._service_conns, START_TIMEOUT)
        except BaseException:
            self.close()
            raise
        return num_blocks

    def send(self, step: Step) -> None:
        dead = [p.name for p in self.processes if not p.is_alive()]
        if dead:
            raise RankFailedError(f"rank process {', '.join(dead)} is not running")
        # Plain pickle: the step's small tensors are copied into the message, not moved through
        # shared-memory handles the way multiprocessing pickles tensors by default.
        message = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.conns:
                conn.send_bytes(message)
        except (BrokenPipeError, OSError) as exc:
            raise RankFailedError(f"a parallel rank is unreachable: {exc}") from None

    def close(self) -> None:
        if self.services is not None:
            self.services.close()
            self.services = None
        for conn in self._service_conns:
            conn.close()
        self._service_conns = []
        for conn in self.conns:
            try:
                conn.send_bytes(_STOP)
            except (BrokenPipeError, OSError):
                pass
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()
        self.conns, self.processes = [], []

    def __del__(self) -> None:
        if getattr(self, "processes", None):
            self.close()
