"""Hugging Face transformers as the independent reference implementation."""

from __future__ import annotations

import torch


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' own forward and KV cache, never stopping at EOS."""
    out = []
    with torch.no_grad():
        res = hf_model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            res = hf_model(torch.tensor([[token]]), past_key_values=res.past_key_values, use_cache=True)
    return out
