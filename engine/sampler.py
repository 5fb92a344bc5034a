"""Turn one row of logits per request into one token, honouring each request's SamplingParams.

A seeded request draws only from its own torch.Generator, one `torch.multinomial` call per row,
over a distribution computed row-wise: its tokens do not depend on which requests share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # chosen token under the raw distribution; None when not asked for
    top_logprobs: list[list[tuple[int, float]] | None]  # top-n (token, logprob), descending


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded for one request, or None (use the default RNG) when no seed is given."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k, then outside its top-p nucleus.

    logits: [m, V] float; top_k: [m] long (>= V keeps all); top_p: [m] float in (0, 1].
    The nucleus is the smallest prefix of tokens by descending probability whose mass is >= top_p;
    it always holds the top token.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [m, V]
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = rank >= top_k[:, None]  # [m, V], in sorted order
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly higher-ranked tokens
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    drop = torch.empty_like(drop).scatter_(-1, order, drop)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


class Sampler:
    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> SamplerOutput:
        if logits.dim() != 2 or not logits.shape[0] == len(params) == len(generators):
            raise ValueError(
                f"need logits [n, vocab] with n == len(params) == len(generators), got "
                f"{tuple(logits.shape)}, {len(params)} params, {len(generators)} generators"
            )
        logits = logits.float()  # [n, V]
        n, vocab = logits.shape
        token_ids = logits.argmax(dim=-1)  # greedy rows keep this; the rest are overwritten
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if rows:
            probs = self._probs(logits[rows], [params[i] for i in rows])  # [m, V]
            unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
            if unseeded:  # all share the default RNG, so one call draws them all
                picked = torch.multinomial(probs[unseeded], 1).squeeze(-1)
                token_ids[[rows[j] for j in unseeded]] = picked
            for j, i in enumerate(rows):
                if (gen := generators[i]) is not None:  # a CPU generator may serve GPU logits
                    token_ids[i] = torch.multinomial(probs[j].to(gen.device), 1, generator=gen)[0]
        out = SamplerOutput(token_ids.tolist(), [None] * n, [None] * n)

        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if lp_rows:
            logprobs = torch.log_softmax(logits[lp_rows], dim=-1)  # [r, V]
            chosen = logprobs.gather(-1, token_ids[lp_rows][:, None]).squeeze(-1).tolist()
            max_n = min(max(params[i].logprobs for i in lp_rows), vocab)
            top_vals, top_ids = (t.tolist() for t in logprobs.topk(max_n, dim=-1))  # [r, max_n]
            for j, i in enumerate(lp_rows):
                out.logprobs[i] = chosen[j]
                if k := params[i].logprobs:
                    out.top_logprobs[i] = list(zip(top_ids[j][:k], top_vals[j][:k], strict=True))
        return out

    @staticmethod
    def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """[m, V] logits of non-greedy rows -> [m, V] probabilities after temperature, top-k, top-p."""
        dev, vocab = logits.device, logits.shape[-1]
        temp = torch.tensor([p.temperature for p in params], device=dev)
        # subtract the row max first so a tiny temperature cannot overflow into inf - inf
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temp[:, None]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        rows = [j for j, p in enumerate(params) if top_k[j] < vocab or p.top_p < 1]
        if rows:  # sorting is the costly part; rows that filter nothing skip it
            logits[rows] = filter_logits(
                logits[rows],
                torch.tensor([top_k[j] for j in rows], device=dev),
                torch.tensor([params[j].top_p for j in rows], device=dev),
            )
        return logits.softmax(dim=-1)
