"""A service every rank beyond 0 of a parallel engine runs beside its steps, called from rank 0.

The engine's steps reach a rank through its step pipe (engine/parallel/ranks.py). Work that is
not a step but must happen where a rank's shard lives (sending or receiving the KV its cache
holds, kv_transfer/rank_kv.py) goes through a second pipe per rank:

    rank 0                                         rank r (a thread beside the step loop)
    services.call(r, "method", *args) ──pipe──►    handler.method(*args), on a small thread pool
         Future  ◄──────── result or error ───────
    services.info[r]                    ◄────────  handler.info() once, when the rank is ready
                                                   handler.housekeeping() every HOUSEKEEPING_S

The handler is built inside the rank from a picklable factory, `factory(place, runner, model)`
(`model`: the whole model's config; the runner's is the rank's shard of it), so it holds the
rank's own cache. Errors come back with their class (pickled; a RuntimeError naming it
when that fails). A rank that dies fails its pending calls, and every later one, with
RankServiceError (the engine's next step fails too, with RankFailedError).
"""

from __future__ import annotations

import itertools
import logging
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from engine.errors import PDServeError

if TYPE_CHECKING:
    from engine.model_config import ModelConfig
    from engine.model_runner import ModelRunner
    from engine.parallel.ranks import RankPlace

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 0.1
MAX_CALLS_IN_FLIGHT = 8  # per rank: calls run on this many threads

RankServiceFactory = Callable[["RankPlace", "ModelRunner", "ModelConfig"], Any]


class RankServiceError(PDServeError, RuntimeError):
    """A rank's service is gone (its process died or never started its service)."""


def _as_sendable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - whatever fails to pickle is reported by name
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def serve_rank(
    factory: RankServiceFactory, place: RankPlace, runner: ModelRunner, model: ModelConfig, conn: Connection
) -> None:
    """Rank r's side: build the handler, report its info, then answer calls until rank 0 goes."""
    try:
        handler = factory(place, runner, model)
        info = handler.info() if hasattr(handler, "info") else None
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, which raises it
        conn.send(("error", _as_sendable(exc)))
        return
    conn.send(("ready", info))
    send_lock = threading.Lock()
    pool = ThreadPoolExecutor(MAX_CALLS_IN_FLIGHT, thread_name_prefix=f"rank{place.rank}-service")
    housekeeping = getattr(handler, "housekeeping", None)

    def run(seq: int, method: str, args: tuple) -> None:
        try:
            reply = (seq, True, getattr(handler, method)(*args))
        except BaseException as exc:  # noqa: BLE001 - the caller's Future raises it
            reply = (seq, False, _as_sendable(exc))
        try:
            with send_lock:
                conn.send(reply)
        except (BrokenPipeError, OSError):
            pass  # rank 0 went away

    try:
        while True:
            if conn.poll(HOUSEKEEPING_S):
                seq, method, args = conn.recv()
                pool.submit(run, seq, method, args)
            elif housekeeping is not None:
                try:
                    housekeeping()
                except Exception:  # noqa: BLE001 - housekeeping must not end the service
                    log.exception("rank %d: service housekeeping failed", place.rank)
    except (EOFError, OSError):
        pass  # rank 0 went away
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(handler, "close", None)
        if close is not None:
            close()


def first_failure(calls: dict[int, Future], timeout: float) -> BaseException | None:
    """The first error among `call_all`'s answers, by rank (a TimeoutError for a rank that has not
    answered within `timeout`); None when every rank succeeded."""
    _, pending = wait(calls.values(), timeout=timeout)
    for rank, future in calls.items():
        if future in pending:
            return TimeoutError(f"rank {rank} did not answer within {timeout:g} s")
        if future.exception() is not None:
            return future.exception()
    return None


class RankServices:
    """Rank 0's side: one pipe per rank 1 .. N-1 (index r - 1), a reader thread resolving each
    call's Future, and every rank's `info`."""

    def __init__(self, conns: list[Connection], timeout: float) -> None:
        self._conns = conns
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._dead: str | None = None
        self.info: dict[int, Any] = {}
        for rank, conn in enumerate(conns, start=1):
            if not conn.poll(timeout):
                raise RankServiceError(f"rank {rank} did not start its service within {timeout:g} s")
            kind, value = conn.recv()
            if kind == "error":
                raise RankServiceError(f"rank {rank} failed to start its service: {value}") from value
            self.info[rank] = value
        self._reader = threading.Thread(target=self._read, name="rank-services", daemon=True)
        self._reader.start()

    @property
    def ranks(self) -> range:
        return range(1, len(self._conns) + 1)

    def call(self, rank: int, method: str, *args: Any) -> Future:
        """Run `handler.method(*args)` on rank `rank`; the Future holds its result or error."""
        future: Future = Future()
        with self._lock:
            if self._dead is not None:
                future.set_exception(RankServiceError(self._dead))
                return future
            seq = next(self._seq)
            self._pending[seq] = future
        try:
            with self._send_lock:
                self._conns[rank - 1].send((seq, method, args))
        except (BrokenPipeError, OSError) as exc:
            self._fail_all(f"rank {rank}'s service is unreachable: {exc}")
        return future

    def call_all(self, method: str, *args: Any) -> dict[int, Future]:
        return {rank: self.call(rank, method, *args) for rank in self.ranks}

    def _read(self) -> None:
        from multiprocessing.connection import wait

        live = list(self._conns)
        while live:
            try:
                ready = wait(live)
            except (OSError, ValueError):  # closed under us: the engine is closing
                return
            for conn in ready:
                try:
                    seq, ok, value = conn.recv()
                except (EOFError, OSError):
                    rank = self._conns.index(conn) + 1
                    self._fail_all(f"rank {rank} exited; its service is gone")
                    live.remove(conn)
                    continue
                with self._lock:
                    future = self._pending.pop(seq, None)
                if future is not None and not future.done():
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)

    def _fail_all(self, why: str) -> None:
        with self._lock:
            self._dead = self._dead or why
            pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            if not future.done():
                future.set_exception(RankServiceError(why))

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self._fail_all("the engine closed")
