"""The GPU fast path's engine side on the CPU: the paged attention backend (block tables and lengths,
one call per phase; the Triton kernels' torch references here) and CUDA-graph decode steps run as
their padded static batches, each giving the default CPU path's greedy tokens. With a GPU: the GPU
path (bfloat16, Triton kernels, captured graphs) against the CPU path."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from engine.cuda_graphs import DecodeGraphs, batch_buckets
from engine.errors import InvalidConfigError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    " ".join(["word"] * 150) + " and then",  # prefilled in chunks over a cached prefix
    "Once upon a time, in a small village by the sea,",
    "List three prime numbers:",
]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
CPU = dict(device="cpu", dtype="float32", kv_cache_memory=64 << 20, max_num_batched_tokens=64)


def engine_llm(loaded, config: EngineConfig) -> LLM:
    return LLM.from_engine(LLMEngine(config, loaded=loaded))


def tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def grouped_tokens(embedded_loaded) -> list[list[int]]:
    """The default CPU path (decode rows grouped by length) under the same batching."""
    return tokens(engine_llm(embedded_loaded, EngineConfig(**CPU)))


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(30) == [1, 2, 4, 8, 16, 24, 30]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


def test_paged_backend_gives_the_grouped_paths_tokens(embedded_loaded, grouped_tokens):
    llm = engine_llm(embedded_loaded, EngineConfig(**CPU, attention_backend="paged"))
    assert llm.engine.runner.paged_attention
    assert tokens(llm) == grouped_tokens


def test_padded_graph_batches_give_the_same_tokens(embedded_loaded, grouped_tokens, monkeypatch):
    """Decode-only steps through DecodeGraphs' static buffers (capture off on the CPU): rows padded up
    to the bucket store nothing and attend nothing."""
    llm = engine_llm(embedded_loaded, EngineConfig(**CPU, attention_backend="paged"))
    llm.engine.runner.enable_cuda_graphs(max_batch=8, max_model_len=1024, capture=False)
    used: list[int] = []
    run = DecodeGraphs.run

    def spy(self, input_ids, positions, metadata):
        used.append(metadata.num_decodes)
        return run(self, input_ids, positions, metadata)

    monkeypatch.setattr(DecodeGraphs, "run", spy)
    free = llm.engine.num_free_blocks
    assert tokens(llm) == grouped_tokens
    assert 5 in used or 3 in used  # batches padded up to a bucket (5 -> 8, 3 -> 4) were replayed
    assert llm.engine.num_free_blocks == free


def test_graphs_need_the_paged_backend_and_a_gpu(embedded_loaded):
    llm = engine_llm(embedded_loaded, EngineConfig(**CPU, attention_backend="grouped"))
    with pytest.raises(ValueError, match="CUDA graphs need paged attention"):
        llm.engine.runner.enable_cuda_graphs(8, 1024)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeGraphs(embedded_loaded.model, 8, 64, torch.device("cpu"))
    with pytest.raises(InvalidConfigError, match="attention_backend must be one of auto, paged, grouped"):
        EngineConfig(attention_backend="flash")
    assert not EngineConfig(device="cpu").paged_attention  # auto: grouped on the CPU


@pytest.mark.gpu
@needs_cuda
def test_gpu_path_greedy_output_matches_the_cpu_path(grouped_tokens):
    """bfloat16, Triton kernels and CUDA graphs against the float32 CPU path. Where bfloat16 rounding
    changes a token, the divergence point is reported and the chosen tokens' log-probabilities agree
    within bfloat16 tolerance up to it."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
    cpu = LLM("smollm2-135m", **CPU).generate(PROMPTS, params, use_tqdm=False)
    gpu_llm = LLM(
        "smollm2-135m", device="cuda", dtype="bfloat16", kv_cache_memory=1 << 30, max_num_batched_tokens=64
    )
    assert gpu_llm.engine.runner.graphs is not None
    gpu = gpu_llm.generate(PROMPTS, params, use_tqdm=False)
    same = 0
    for prompt, c, g in zip(PROMPTS, cpu, gpu, strict=True):
        pairs = enumerate(zip(c.token_ids, g.token_ids, strict=True))
        diverge = next((i for i, (a, b) in pairs if a != b), None)
        if diverge is None:
            same += 1
            continue
        print(f"bfloat16 diverges from float32 at token {diverge} of {prompt!r}")
        for i in range(diverge):
            lp_c, lp_g = c.logprobs[i], g.logprobs[i]
            assert abs(lp_c - lp_g) < 0.15, (prompt, i, lp_c, lp_g)
    assert same >= len(PROMPTS) - 2
