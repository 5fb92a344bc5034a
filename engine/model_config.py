"""One normalised description of a Llama-family model, whatever checkpoint format it came from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from engine.errors import CorruptCheckpointError, UnsupportedModelError

# HF `architectures` entries / GGUF `general.architecture` values this runtime implements.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_GGUF_ARCHITECTURES = {"llama", "mistral", "qwen2"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-frequency scaling; `llama3` is Llama 3.1's piecewise rescaling of long wavelengths."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )
        if self.factor <= 0:
            raise UnsupportedModelError(f"rope_scaling factor must be > 0, got {self.factor}")

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling:
        if not d:
            return cls()
        rope_type = d.get("rope_type", d.get("type", "default"))
        return cls(
            rope_type=rope_type,
            factor=float(d.get("factor", 1.0)),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a Llama-family decoder (Llama 2/3/3.1, Mistral, SmolLM2, Qwen2/2.5)."""

    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # GGUF `rope_freqs`: per-frequency divisors
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise CorruptCheckpointError(f"model config {key} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise CorruptCheckpointError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @cached_property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @cached_property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @cached_property
    def max_model_len(self) -> int:
        """Longest context served exactly: a sliding window (Mistral v0.1) caps full attention."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def num_params(self) -> int:
        h, f, layers = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        per_layer = attn + 3 * h * f + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers * per_layer + embed + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict[str, Any], name: str = "") -> ModelConfig:
        """From a Hugging Face `config.json` dict."""
        archs = d.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = d.get("model_type")
            if model_type in SUPPORTED_ARCHITECTURES.values():
                arch = model_type
            else:
                raise UnsupportedModelError(
                    f"architecture {archs or model_type!r} is not supported; pdserve runs "
                    f"{sorted(SUPPORTED_ARCHITECTURES)} (Llama 2/3/3.1, Mistral, SmolLM2, Qwen2/2.5)"
                )
        if d.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
        try:
            num_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            use_window = d.get("use_sliding_window", arch == "mistral")
            return cls(
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d.get("head_dim") or hidden // num_heads),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(
                    d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 1e4))
                ),
                rope_scaling=RopeScaling.from_hf(d.get("rope_scaling") or _rope_parameters(d)),
                qkv_bias=bool(d.get("attention_bias", arch == "qwen2")),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                sliding_window=int(d["sliding_window"]) if use_window and d.get("sliding_window") else None,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                name=name or d.get("_name_or_path", ""),
            )
        except KeyError as exc:
            raise CorruptCheckpointError(f"config.json lacks required key {exc.args[0]!r}") from exc

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output_weight: bool, name: str = "") -> ModelConfig:
        """From GGUF metadata (`{arch}.block_count`, ...); tied embeddings when there is no `output`."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported; "
                f"supported: {sorted(SUPPORTED_GGUF_ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise CorruptCheckpointError(f"GGUF metadata lacks {arch}.{key}")
            return value

        num_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        scaling = None
        scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling_type == "linear":
            scaling = {"rope_type": "linear", "factor": meta.get(f"{arch}.rope.scaling.factor", 1.0)}
        elif scaling_type != "none":  # yarn etc.: running it unscaled would silently give wrong output
            raise UnsupportedModelError(
                f"GGUF rope scaling type {scaling_type!r} is not supported; supported: none, linear "
                "(Llama 3.1 scaling arrives as rope_freqs and is supported)"
            )
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // num_heads),
            max_position_embeddings=int(get("context_length")),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=RopeScaling.from_hf(scaling),
            qkv_bias=arch == "qwen2",
            tie_word_embeddings=not has_output_weight,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            name=name or meta.get("general.name", ""),
        )


def _rope_parameters(d: dict[str, Any]) -> dict[str, Any] | None:
    """transformers >= 5 writes `rope_parameters` instead of `rope_scaling`."""
    params = d.get("rope_parameters")
    if not params or params.get("rope_type", "default") == "default":
        return None
    return params
