"""`EngineLoop`: one engine stepped on its own thread, with work handed in from other threads.

    other threads ── submit(fn) ──► inbox ──┐
                                            ▼  (loop thread)
           ┌──► run every fn in the inbox (add/abort requests: the engine is touched only here)
           │    housekeeping()              (lease and deadline expiry, load reports)
           │    step(layer_hook) ──► on_outputs(outputs)
           └──── while work remains; otherwise sleep until submit() or the idle tick

A worker (prefill or decode) is this loop plus what it does with outputs; the loop is written
once for both. `submit` returns a Future with what `fn` returned or raised.

A step that raises (a dead rank of a parallel engine, a device error) ends the loop: the worker
reports itself unhealthy, and `on_failure(exc)`, when its host set one, decides what becomes of
the instance (the Ray actor ends its process, so Ray restarts the whole instance).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from engine.llm_engine import LayerHook, LLMEngine
from engine.outputs import RequestOutput

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        on_outputs: Callable[[list[RequestOutput]], None],
        layer_hook: LayerHook | None = None,
        housekeeping: Callable[[], None] | None = None,
        idle_tick: float = 0.5,
        name: str = "engine-loop",
    ) -> None:
        self.engine = engine
        self.on_outputs = on_outputs
        self.layer_hook = layer_hook
        self.housekeeping = housekeeping
        self.idle_tick = idle_tick
        self.num_steps = 0
        self.step_times: deque[float] = deque(maxlen=4096)  # seconds of recent steps, for benchmarks
        self._inbox: list[tuple[Callable[[], Any], Future]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.on_failure: Callable[[BaseException], None] | None = None  # set by the host

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the loop thread before its next step."""
        future: Future = Future()
        with self._wake:
            if self._stopping:
                future.set_exception(RuntimeError("the engine loop is stopped"))
                return future
            self._inbox.append((fn, future))
            self._wake.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._inbox and not self._stopping and not self.engine.has_unfinished_requests():
                    self._wake.wait(self.idle_tick)
                if self._stopping:
                    inbox, self._inbox = self._inbox, []
                    for _, future in inbox:
                        future.set_exception(RuntimeError("the engine loop is stopped"))
                    return
                inbox, self._inbox = self._inbox, []
            for fn, future in inbox:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - the caller gets it through the future
                    future.set_exception(exc)
            if self.housekeeping is not None:
                self._guarded(self.housekeeping)
            if self.engine.has_unfinished_requests():
                # A failing step is a bug or a lost rank, not bad input (that fails one request
                # inside the engine): it ends the loop, the worker reports itself dead and its host
                # restarts it.
                began = time.perf_counter()
                try:
                    outputs = self.engine.step(self.layer_hook)
                except BaseException as exc:
                    log.critical("%s: a step failed; the loop stops", self._thread.name, exc_info=True)
                    if self.on_failure is not None:
                        self.on_failure(exc)
                    return
                self.step_times.append(time.perf_counter() - began)
                self.num_steps += 1
                if outputs:
                    self._guarded(self.on_outputs, outputs)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a handler's bug must not stop the loop serving others
            log.exception("engine loop handler failed")
