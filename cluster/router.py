"""Which prefill and which decode instance serve a request: the router's policy, a plain class.

    admit(request) ──► prefill: least pending prefill tokens (ties: fewest running requests)
                   ──► decode:  most free KV blocks that can hold the prompt (ties: lowest load)
                   ──► Overloaded when the waiting queue is at its bound, or nothing is healthy
    colocated replicas instead of the two pools: one replica serves both phases, the one with the
    least pending prompt tokens that can hold the request (ties: fewest running, most free KV);
    the route names it twice. The placement simulator routes colocated instances the same way.

Instances report their load (`report`); the router also counts what it sent since the last
report, so a burst between reports spreads out instead of piling onto one instance. Any number
of instances per pool (DistServe's own code runs exactly one of each).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.protocol import Overloaded

__all__ = ["DecodeLoad", "Overloaded", "PrefillLoad", "Route", "Router"]


@dataclass
class PrefillLoad:
    pending_tokens: int = 0  # prompt tokens queued or being prefilled
    running: int = 0  # requests in its queue or batch
    healthy: bool = True


@dataclass
class DecodeLoad:
    free_blocks: int = 0  # KV blocks it can still reserve
    block_size: int = 16
    running: int = 0  # sequences in its batch
    max_batch: int = 64
    healthy: bool = True
    pending_tokens: int = 0  # colocated: prompt tokens admitted and not yet prefilled

    def can_hold(self, num_tokens: int) -> bool:
        has_room = self.free_blocks * self.block_size >= num_tokens
        return self.healthy and self.running < self.max_batch and has_room


@dataclass(frozen=True)
class Route:
    prefill: str
    decode: str  # the same instance as prefill for a colocated replica


@dataclass
class Router:
    max_waiting: int = 256  # requests admitted but not yet decoding, across the cluster
    prefill: dict[str, PrefillLoad] = field(default_factory=dict)
    decode: dict[str, DecodeLoad] = field(default_factory=dict)
    colocated: dict[str, DecodeLoad] = field(default_factory=dict)
    waiting: int = 0

    def report_prefill(self, instance: str, load: PrefillLoad) -> None:
        self.prefill[instance] = load

    def report_decode(self, instance: str, load: DecodeLoad) -> None:
        self.decode[instance] = load

    def report_colocated(self, instance: str, load: DecodeLoad) -> None:
        self.colocated[instance] = load

    def remove(self, instance: str) -> None:
        """An instance died or is draining: route nothing more to it."""
        self.prefill.pop(instance, None)
        self.decode.pop(instance, None)
        if instance in self.colocated:  # kept, so the router still knows it routes colocated
            self.colocated[instance].healthy = False

    def admit(self, num_prompt_tokens: int, max_new_tokens: int) -> Route:
        """Pick the instances for a request and count it against their load; raises Overloaded."""
        if self.waiting >= self.max_waiting:
            raise Overloaded(
                f"{self.waiting} requests are waiting (the bound is {self.max_waiting}); retry later"
            )
        if self.colocated:
            return self._admit_colocated(num_prompt_tokens)
        prefills = [(name, load) for name, load in self.prefill.items() if load.healthy]
        if not prefills:
            raise Overloaded("no healthy prefill instance")
        need = num_prompt_tokens + 1  # the prompt's KV plus the first token's
        decodes = [(name, load) for name, load in self.decode.items() if load.can_hold(need)]
        if not decodes:
            raise Overloaded(
                f"no decode instance has room for {need} tokens of KV now; retry later"
                if any(load.healthy for load in self.decode.values())
                else "no healthy decode instance"
            )
        p_name, p_load = min(prefills, key=lambda item: (item[1].pending_tokens, item[1].running, item[0]))
        d_name, d_load = min(decodes, key=lambda item: (-item[1].free_blocks, item[1].running, item[0]))
        # Count the request until the instances' next reports say where it stands.
        p_load.pending_tokens += num_prompt_tokens
        p_load.running += 1
        d_load.free_blocks -= -(-need // d_load.block_size)
        d_load.running += 1
        self.waiting += 1
        return Route(p_name, d_name)

    def _admit_colocated(self, num_prompt_tokens: int) -> Route:
        need = num_prompt_tokens + 1
        fits = [(name, load) for name, load in self.colocated.items() if load.can_hold(need)]
        if not fits:
            raise Overloaded(
                f"no colocated instance has room for {need} tokens of KV now; retry later"
                if any(load.healthy for load in self.colocated.values())
                else "no healthy colocated instance"
            )
        name, load = min(
            fits, key=lambda item: (item[1].pending_tokens, item[1].running, -item[1].free_blocks, item[0])
        )
        load.pending_tokens += num_prompt_tokens
        load.free_blocks -= -(-need // load.block_size)
        load.running += 1
        self.waiting += 1
        return Route(name, name)

    def leave_queue(self) -> None:
        """A routed request started decoding, or failed or was cancelled before: it no longer waits."""
        self.waiting = max(0, self.waiting - 1)
