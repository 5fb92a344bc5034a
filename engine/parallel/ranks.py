"""A tensor-parallel engine's ranks beyond rank 0, as local processes, and the loop each one runs.

    rank 0: the engine's own process                  rank r = 1 .. N-1: a spawned process
    schedule, prepare the step's inputs ──pipe──────> inputs
    forward  <──── all-reduce x 2 per layer ────────> forward (its heads, its MLP slice)
    logits, sample                                    nothing more: the hidden state is whole

Steps reach a rank through a pipe of its own, where it waits however long the engine idles;
torch.distributed (gloo on CPUs, NCCL on GPUs) carries only the all-reduces inside a step, under
a timeout, so a rank that dies fails the step (and the group) instead of hanging it. Before the
first step every rank reports how many cache blocks its memory holds and all take the smallest,
so block ids mean the same on every rank.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from engine.engine_config import EngineConfig
from engine.errors import PDServeError
from engine.kv_cache import num_blocks_for
from engine.model_loader import LoadedModel, load_model
from engine.model_runner import ModelRunner, StepInputs
from engine.parallel.tensor_parallel import TPShard, apply_tensor_parallel

COLLECTIVE_TIMEOUT = timedelta(seconds=120)  # one step's all-reduces; a dead rank fails it after this
START_TIMEOUT = 600.0  # seconds for every rank to load its shard
_STOP = b"stop"  # rank 0 -> rank r: no more steps (any other message is a pickled StepInputs)


class RankFailedError(PDServeError, RuntimeError):
    """A tensor-parallel rank died or failed; the engine cannot step any more."""


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the same CPU, or the r-th GPU after the configured one."""
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


def connect_group(config: EngineConfig, rank: int, size: int, store: dist.Store) -> dist.ProcessGroup:
    """This rank's process group over `store`: gloo on CPUs, NCCL on GPUs. A group object of its
    own, not torch.distributed's global default one, so several engines can live in one process."""
    device = rank_device(config.torch_device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return dist.ProcessGroupNCCL(store, rank, size)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = COLLECTIVE_TIMEOUT
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]  # ranks share a node
    return dist.ProcessGroupGloo(store, rank, size, options)


def _store(port: int, size: int, master: bool) -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1", port, size, master, timedelta(seconds=START_TIMEOUT), wait_for_workers=False
    )


def load_rank(
    config: EngineConfig, rank: int, size: int, group: dist.ProcessGroup
) -> tuple[LoadedModel, int]:
    """Rank `rank`'s shard, summing over `group`, and the cache blocks it can hold."""
    device = rank_device(config.torch_device, rank)
    loaded = load_model(config.model, config.torch_dtype, device, seed=config.seed, tp=(rank, size))
    apply_tensor_parallel(loaded.model, group)
    largest = TPShard(loaded.config, rank, size).largest
    return loaded, num_blocks_for(largest, config.cache, config.torch_dtype, device)


def _rank_main(config: EngineConfig, rank: int, size: int, port: int, threads: int, conn: Connection) -> None:
    """Rank r >= 1: join the group, load its shard, then run every step rank 0 sends until told to stop."""
    try:
        torch.set_num_threads(threads)
        group = connect_group(config, rank, size, _store(port, size, master=False))
        loaded, capacity = load_rank(config, rank, size, group)
        conn.send(("capacity", capacity))
        num_blocks = conn.recv()
        device = rank_device(config.torch_device, rank)
        runner = ModelRunner(loaded.model, config.cache, device, config.onednn_linear, num_blocks=num_blocks)
        conn.send(("ready", None))
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"))
        return
    try:
        while (message := conn.recv_bytes()) != _STOP:
            runner.forward(pickle.loads(message))
    except (EOFError, OSError):
        pass  # rank 0 went away


class TensorParallelRanks:
    """Rank 0's handle on ranks 1 .. N-1: starts them, joins their group, agrees on the cache size,
    and hands each step's inputs to every rank (`send`, the model runner's fan-out). `group` is
    rank 0's own member of the group."""

    def __init__(self, config: EngineConfig) -> None:
        self.size = config.tensor_parallel_size
        self._store = _store(0, self.size, master=True)  # port 0: any free one, then told to the ranks
        threads = max(1, torch.get_num_threads() // self.size)
        torch.set_num_threads(threads)  # the ranks share this machine's cores
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes: list[mp.Process] = []
        for rank in range(1, self.size):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(
                target=_rank_main,
                args=(config, rank, self.size, self._store.port, threads, theirs),
                name=f"pdserve-tp{rank}",
                daemon=True,
            )
            p.start()
            theirs.close()
            self.conns.append(ours)
            self.processes.append(p)
        try:
            self.group = connect_group(config, 0, self.size, self._store)
        except Exception:
            self.close()
            raise

    def _expect(self, conn: Connection, what: str) -> object:
        if not conn.poll(START_TIMEOUT):
            raise RankFailedError(f"a tensor-parallel rank did not report its {what} in {START_TIMEOUT:g} s")
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):
            raise RankFailedError("a tensor-parallel rank exited while starting") from None
        if kind == "error":
            raise RankFailedError(f"a tensor-parallel rank failed to start: {value}")
        if kind != what:
            raise RankFailedError(f"a tensor-parallel rank sent {kind!r} where {what!r} was due")
        return value

    def agree_num_blocks(self, own: int) -> int:
        """The smallest cache any rank can hold, sent to all of them; returns it."""
        try:
            num_blocks = min([own] + [int(self._expect(c, "capacity")) for c in self.conns])
            for conn in self.conns:
                conn.send(num_blocks)
            for conn in self.conns:
                self._expect(conn, "ready")
        except BaseException:
            self.close()
            raise
        return num_blocks

    def send(self, inputs: StepInputs) -> None:
        dead = [p.name for p in self.processes if not p.is_alive()]
        if dead:
            raise RankFailedError(f"tensor-parallel rank process {', '.join(dead)} is not running")
        # Plain pickle: the step's small tensors are copied into the message, not moved through
        # shared-memory handles the way multiprocessing pickles tensors by default.
        message = pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.conns:
                conn.send_bytes(message)
        except (BrokenPipeError, OSError) as exc:
            raise RankFailedError(f"a tensor-parallel rank is unreachable: {exc}") from None

    def close(self) -> None:
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
