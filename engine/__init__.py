"""The runtime both worker kinds share: models, loaders, tokenizer, paged KV cache, runner, sampling.

The offline API::

    from engine import LLM, SamplingParams
    llm = LLM(model="smollm2-135m")
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "EngineConfig": "engine.engine_config",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, so that importing one submodule (e.g. the block manager) does not load the whole runtime.
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
