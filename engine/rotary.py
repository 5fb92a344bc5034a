"""Rotary position embedding (rotate-half form, as in Hugging Face checkpoints), with Llama 3.1 scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.errors import CorruptCheckpointError
from engine.model_config import ModelConfig, RopeScaling


def rope_inv_freq(
    head_dim: int, theta: float, scaling: RopeScaling, freq_factors: tuple[float, ...] | None = None
) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2]. `freq_factors` is llama.cpp's form of the same scaling
    (a GGUF `rope_freqs` tensor of divisors, as converters write for Llama 3.1)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        orig = scaling.original_max_position_embeddings
        low_wavelen = orig / scaling.low_freq_factor
        high_wavelen = orig / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (orig / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, blended, scaled)
    if freq_factors is not None:
        if len(freq_factors) != head_dim // 2:
            raise CorruptCheckpointError(f"rope_freqs has {len(freq_factors)} entries, not {head_dim // 2}")
        inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float64, device="cpu")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # A plain attribute, not a buffer: the model is built on the meta device and this must be real.
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_freq_factors)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, 1, D], computed in float32 once per step for all layers."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
