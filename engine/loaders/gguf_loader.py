"""GGUF checkpoints: config and tokenizer from the metadata, tensors dequantized with the `gguf` package.

llama.cpp's converter permutes the rows of Q and K of `llama` models so that rotary pairs are
adjacent (interleaved form); `_unpermute` restores the Hugging Face rotate-half order. Llama 3.1's
rope scaling arrives as a `rope_freqs` tensor of per-frequency divisors, kept in the config.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from engine.errors import CorruptCheckpointError, TokenizerUnavailableError, UnsupportedModelError
from engine.loaders.gguf_file import GGUFFile
from engine.model_config import ModelConfig

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors the model does not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    # rows [heads, D/2, 2] (llama.cpp) -> [heads, 2, D/2] (HF rotate-half)
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.metadata = self.file.metadata
        tensors = {t.name: t for t in self.file.tensors}
        config = ModelConfig.from_gguf(self.metadata, "output.weight" in tensors, name=self.path.stem)
        if "rope_freqs.weight" in tensors:  # Llama 3.1 scaling as llama.cpp stores it
            factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32)
            config = config.replace(rope_freq_factors=tuple(float(f) for f in factors.reshape(-1)))
        self.config = config

    def tokenizer(self):
        """The embedded tokenizer; None (token-id prompts only) when its kind is not supported."""
        from engine.tokenizer import Tokenizer

        try:
            return Tokenizer.from_gguf_metadata(self.metadata)
        except (UnsupportedModelError, TokenizerUnavailableError) as exc:
            warnings.warn(f"{self.path.name}: serving token ids only, no tokenizer: {exc}", stacklevel=2)
            return None

    @property
    def num_tensors(self) -> int:
        return len(self.file.tensors)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        cfg = self.config
        permuted = cfg.architecture in ("llama", "mistral")
        for t in self.file.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            try:
                w = dequantize(t.data, GGMLQuantizationType(t.ggml_type))
            except Exception as exc:
                raise CorruptCheckpointError(
                    f"{self.path}: tensor {t.name} cannot be decoded: {exc}"
                ) from exc
            if permuted and name.endswith("q_proj.weight"):
                w = _unpermute(w, cfg.num_heads)
            elif permuted and name.endswith("k_proj.weight"):
                w = _unpermute(w, cfg.num_kv_heads)
            yield name, torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
