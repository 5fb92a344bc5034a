"""The CPU engine keeps a step's temporaries mapped: repeated prefills stop faulting pages."""

import resource
import sys

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.cpu_allocator import keep_freed_memory

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


@linux_only
def test_keep_freed_memory_is_accepted_and_idempotent():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True


@linux_only
def test_prefills_do_not_refault_their_temporaries(embedded_loaded):
    engine = LLMEngine(
        EngineConfig(device="cpu", dtype="float32", kv_cache_memory=64 << 20), loaded=embedded_loaded
    )

    def prefill(i: int) -> None:
        engine.add_request(list(range(100 + i, 1124 + i)), SamplingParams(max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()

    prefill(0)  # the heap reaches its high-water mark
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(1, 4):
        prefill(i)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    # glibc's defaults map and unmap this prefill's large temporaries every step: ~185,000 faults.
    assert faults < 2_000, f"{faults:.0f} minor page faults per 1,024-token prefill"
