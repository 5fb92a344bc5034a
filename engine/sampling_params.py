"""Per-request sampling options, validated once when a request arrives."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from engine.errors import InvalidSamplingParamsError

MAX_LOGPROBS = 20


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise InvalidSamplingParamsError(f"{name} must be {allowed}, got {value!r}")


def _as_tuple(name: str, value: Any) -> tuple:
    if isinstance(value, str):
        return (value,)
    _check(isinstance(value, (list, tuple)), name, value, "a list or tuple")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token
    min_tokens: int = 0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        mt, t, p = self.max_tokens, self.temperature, self.top_p
        k, n, m = self.top_k, self.logprobs, self.min_tokens
        _check(_is_int(mt) and mt >= 1, "max_tokens", mt, "an int >= 1")
        _check(_is_number(t) and math.isfinite(t) and t >= 0, "temperature", t, "a finite number >= 0")
        _check(_is_number(p) and 0 < p <= 1, "top_p", p, "a number in (0, 1]")
        _check(_is_int(k) and k >= -1, "top_k", k, "an int >= -1 (0 or -1 disable it)")
        ok_seed = self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64)
        _check(ok_seed, "seed", self.seed, "None or an int in [-2**63, 2**64) (what torch.Generator accepts)")
        stop = _as_tuple("stop", self.stop)
        for s in stop:
            _check(isinstance(s, str) and s != "", "stop", s, "a non-empty string (each entry)")
        ids = _as_tuple("stop_token_ids", self.stop_token_ids)
        for i in ids:
            _check(_is_int(i) and i >= 0, "stop_token_ids", i, "a non-negative int (each entry)")
        _check(
            n is None or (_is_int(n) and 0 <= n <= MAX_LOGPROBS), "logprobs", n, f"None or 0..{MAX_LOGPROBS}"
        )
        _check(_is_int(m) and 0 <= m <= mt, "min_tokens", m, f"an int in 0..max_tokens ({mt})")
        for name in ("ignore_eos", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "a bool")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        if not isinstance(d, Mapping):
            raise InvalidSamplingParamsError(f"sampling params must be a mapping, got {type(d).__name__}")
        allowed = [f.name for f in fields(cls)]
        for key in d:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise InvalidSamplingParamsError(
                    f"unknown sampling parameter {key!r}{hint} (allowed: {', '.join(allowed)})"
                )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
