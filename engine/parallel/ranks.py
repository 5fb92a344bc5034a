"""An engine's ranks beyond rank 0 as local processes, and the loop each one runs. The engine has
tp*pp ranks, rank g = stage*tp + t (engine/parallel/pipeline.py); with one stage:

    rank 0: the engine's own process                  rank r = 1 .. N-1: a spawned process
    schedule, prepare the step's inputs ──pipe──────> inputs
    forward  <──── all-reduce x 2 per layer ────────> forward (its heads, its MLP slice)
    logits, sample                                    nothing more: the hidden state is whole

and with several, the stages hand the hidden state of each micro-batch on, point to point, and
the last sends the logits back to rank 0.

Steps reach a rank through a pipe of its own, where it waits however long the engine idles;
torch.distributed (gloo on CPUs, NCCL on GPUs) carries only the all-reduces and hand-offs inside
a step, under a timeout, so a rank that dies fails the step (and the engine) instead of hanging
it. Before the first step every rank reports how many cache blocks its memory holds and all take
the smallest, so block ids mean the same on every rank. An engine may also give its ranks a
service to run beside their steps (engine/parallel/rank_service.py: the KV transfer of a
disaggregated instance), reached through a second pipe each.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection

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


def _group(device: torch.device, store: dist.Store, rank: int, size: int) -> dist.ProcessGroup:
    """A process group over `store`: gloo on CPUs, NCCL on GPUs. A group object of its own, not
    torch.distributed's global default one, so several engines can live in one process."""
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, size)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = COLLECTIVE_TIMEOUT
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]  # ranks share a node
    return dist.ProcessGroupGloo(store, rank, size, options)


def connect_groups(config: EngineConfig, place: RankPlace, store: dist.Store) -> RankGroups:
    """This rank's groups over `store` (each under a prefix of its own)."""
    device = rank_device(config.torch_device, place.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = _group(device, dist.PrefixStore("world", store), place.rank, place.tp * place.pp)
    if place.tp == 1:
        return RankGroups(world, None)
    if place.pp == 1:
        return RankGroups(world, world)
    tp_store = dist.PrefixStore(f"tp{place.stage}", store)
    return RankGroups(world, _group(device, tp_store, place.tp_rank, place.tp))


def _store(port: int, size: int, master: bool) -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1", port, size, master, timedelta(seconds=START_TIMEOUT), wait_for_workers=False
    )


def load_rank(
    config: EngineConfig, place: RankPlace, groups: RankGroups
) -> tuple[LoadedModel, int, StageLinks | None]:
    """The rank's shard of its stage (summing over its TP group), the cache blocks it can hold,
    and its pipeline links (None with one stage)."""
    device = rank_device(config.torch_device, place.rank)
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


def _rank_main(
    config: EngineConfig,
    rank: int,
    port: int,
    threads: int,
    conn: Connection,
    service: RankServiceFactory | None,
    service_conn: Connection | None,
) -> None:
    """Rank r >= 1: join the groups, load its shard, start its service (if any), then run every
    step rank 0 sends until told to stop."""
    try:
        torch.set_num_threads(threads)
        place = RankPlace.of(config, rank)
        groups = connect_groups(config, place, _store(port, place.tp * place.pp, master=False))
        loaded, capacity, links = load_rank(config, place, groups)
        conn.send(("capacity", capacity))
        num_blocks = conn.recv()
        device = rank_device(config.torch_device, rank)
        runner = ModelRunner(
            loaded.model, config.cache, device, config.onednn_linear, num_blocks=num_blocks, links=links
        )
        service_thread = None
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


class ParallelRanks:
    """Rank 0's handle on ranks 1 .. N-1: starts them, joins their groups, agrees on the cache
    size, and hands each step to every rank (`send`, the model runner's fan-out). `groups` are
    rank 0's own members of the groups."""

    def __init__(self, config: EngineConfig, service: RankServiceFactory | None = None) -> None:
        """`service`: built in every rank beyond 0 and reachable as `services` once the cache
        size is agreed."""
        self.size = config.tensor_parallel_size * config.pipeline_parallel_size
        self.services: RankServices | None = None
        self._service = service
        self._service_conns: list[Connection] = []
        self._store = _store(0, self.size, master=True)  # port 0: any free one, then told to the ranks
        threads = max(1, torch.get_num_threads() // self.size)
        torch.set_num_threads(threads)  # the ranks share this machine's cores
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes: list[mp.Process] = []
        for rank in range(1, self.size):
            ours, theirs = ctx.Pipe()
            service_ours, service_theirs = ctx.Pipe() if service is not None else (None, None)
            p = ctx.Process(
                target=_rank_main,
                args=(config, rank, self._store.port, threads, theirs, service, service_theirs),
                name=f"pdserve-rank{rank}",
                daemon=True,
            )
            p.start()
            theirs.close()
            if service is not None:
                service_theirs.close()
                self._service_conns.append(service_ours)
            self.conns.append(ours)
            self.processes.append(p)
        try:
            self.groups = connect_groups(config, RankPlace.of(config, 0), self._store)
        except Exception:
            self.close()
            raise

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
