"""oneDNN packed linears against nn.Linear, and the switch that keeps torch's own path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.cpu_linear import PackedLinear, onednn_linear_available, pack_linears


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_matches_linear(bias, rows):
    assert onednn_linear_available(torch.float32)  # x86 CPUs with torch's oneDNN: the CI machine
    torch.manual_seed(rows)
    ref = nn.Linear(96, 200, bias=bias)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(ref)(x), ref(x), atol=1e-5, rtol=1e-5)


def test_pack_linears_replaces_every_linear_once():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4, bias=False)))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = model(x)
        assert pack_linears(model) == 2
        assert pack_linears(model) == 0  # already packed
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 2


def test_engine_switch_keeps_torch_linears(embedded_gguf_path):
    from engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(device="cpu", onednn_linear=False, kv_cache_memory=8 << 20))
    model = engine.runner.model
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert sum(type(m) is nn.Linear for m in model.modules()) == 4 * 30 + 1


def test_self_check_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    onednn_linear_available.cache_clear()
    assert onednn_linear_available(torch.float32)
    torch.testing.assert_close(torch.rand(4), expected, atol=0, rtol=0)
