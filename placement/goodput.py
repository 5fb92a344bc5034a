"""Goodput: the highest request rate whose SLO attainment meets the target, found by bracketing
and bisection. One search for simulated runs (the planner) and measured ones (`pdserve bench`)."""

from __future__ import annotations

from collections.abc import Callable

_CEILING = 1e7  # req/s; beyond this a configuration is not rate-limited in any meaningful sense


def bisect_goodput(
    meets: Callable[[float], bool],
    first_guess: float,
    steps: int = 5,
    max_halvings: int = 10,
    growth: float = 2.0,
) -> float:
    """The highest rate for which `meets(rate)` holds, assuming it holds below some rate and fails
    above it. Multiplies `first_guess` by `growth` until a rate fails (or divides it, at most
    `max_halvings` times, until one passes; 0 if none does), then bisects the bracket `steps`
    times and returns its lower end, a rate that was seen to pass. A good first guess and a
    growth near 1 spend fewer probes (each a whole run when measured) on the bracket."""
    if not first_guess > 0:
        raise ValueError(f"first_guess must be a positive rate, got {first_guess!r}")
    if not growth > 1:
        raise ValueError(f"growth must be > 1, got {growth!r}")
    low, high = 0.0, first_guess
    while meets(high):
        low, high = high, high * growth
        if high > _CEILING:
            return high
    if low == 0.0:  # find any rate that works, or give up
        probe = high / growth
        for _ in range(max_halvings):
            if meets(probe):
                low = probe
                break
            high, probe = probe, probe / growth
        else:
            return 0.0
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if meets(mid) else (low, mid)
    return low
