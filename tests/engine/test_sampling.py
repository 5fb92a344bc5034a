import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidSamplingParamsError
from engine.sampler import Sampler, make_generator
from engine.sampling_params import SamplingParams

sampler = Sampler()


def sample(logits: torch.Tensor, params: list[SamplingParams], generators=None):
    return sampler.sample(logits, params, generators or [None] * len(params))


def sample_many(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n draws from one row of logits, using the default RNG seeded once."""
    torch.manual_seed(seed)
    return torch.tensor(sample(logits.expand(n, -1), [params] * n).token_ids)


def expected_probs(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """Reference distribution, computed independently in float64 Python."""
    m = max(logits)
    w = [math.exp((x - m) / temperature) for x in logits]
    order = sorted(range(len(w)), key=lambda i: -w[i])
    if top_k > 0:
        order = order[:top_k]
    total, kept, mass = sum(w[i] for i in order), [], 0.0
    for i in order:
        kept.append(i)
        mass += w[i] / total
        if mass >= top_p:
            break
    z = sum(w[i] for i in kept)
    return [w[i] / z if i in kept else 0.0 for i in range(len(w))]


# --- SamplingParams -------------------------------------------------------------------------------

INVALID = [
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", True),
    ("max_tokens", 2.0),
    ("temperature", -1.0),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", "0.5"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("top_p", float("nan")),
    ("top_k", -2),
    ("top_k", 1.5),
    ("seed", 1.5),
    ("seed", "42"),
    ("seed", 2**64),
    ("stop", [""]),
    ("stop", ["ok", 3]),
    ("stop", 7),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1, 2.0]),
    ("stop_token_ids", [True]),
    ("ignore_eos", 1),
    ("logprobs", 21),
    ("logprobs", -1),
    ("logprobs", 2.5),
    ("min_tokens", -1),
    ("min_tokens", 17),  # > max_tokens (16)
    ("skip_special_tokens", "yes"),
]


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_invalid_value_raises_naming_field_and_value(field, value):
    with pytest.raises(InvalidSamplingParamsError, match=field) as info:
        SamplingParams(**{field: value})
    assert repr(value if not isinstance(value, list) else value[-1]) in str(info.value)
    with pytest.raises(InvalidSamplingParamsError, match=field):
        SamplingParams.from_dict({field: value})


def test_valid_edges_and_normalisation():
    p = SamplingParams(max_tokens=1, temperature=0, top_p=1, top_k=-1, logprobs=20, stop="</s>", min_tokens=1)
    assert p.stop == ("</s>",) and isinstance(p.temperature, float) and p.is_greedy
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[2, 0]).stop_token_ids == (2, 0)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(top_k=1).is_greedy and not SamplingParams().is_greedy
    with pytest.raises(AttributeError):
        p.max_tokens = 3


def test_from_dict_round_trip():
    p = SamplingParams(max_tokens=5, temperature=0.7, top_k=40, seed=3, stop=["\n"], logprobs=2)
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert SamplingParams.from_dict({}) == SamplingParams()


def test_from_dict_unknown_key_suggests_closest():
    with pytest.raises(InvalidSamplingParamsError, match="'temprature'.*did you mean 'temperature'") as info:
        SamplingParams.from_dict({"temprature": 0.5})
    assert "max_tokens" in str(info.value)  # lists the allowed names
    with pytest.raises(InvalidSamplingParamsError, match="'best_of'") as info:
        SamplingParams.from_dict({"best_of": 2})
    assert "did you mean" not in str(info.value) and "skip_special_tokens" in str(info.value)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams.from_dict([("max_tokens", 3)])


# --- Sampler --------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_leaves_rng_alone():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    gens = [make_generator(i) for i in range(6)]
    out = sample(logits, [SamplingParams(temperature=0.0)] * 6, gens)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6
    fresh = make_generator(0)
    assert torch.equal(gens[0].get_state(), fresh.get_state())


def test_top_k_1_equals_greedy():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    out = sample(
        logits, [SamplingParams(temperature=1.5, top_k=1)] * 8, [make_generator(i) for i in range(8)]
    )
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_stays_inside_k_largest():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(2))
    drawn = set(sample_many(logits, SamplingParams(temperature=2.0, top_k=5), 4000).tolist())
    assert drawn == set(logits[0].topk(5).indices.tolist())


def test_top_p_stays_inside_nucleus():
    probs = torch.tensor([0.05, 0.3, 0.15, 0.5])  # nucleus for top_p=0.7 is {3, 1}
    logits = probs.log()[None]
    assert set(sample_many(logits, SamplingParams(top_p=0.7), 4000).tolist()) == {1, 3}
    assert set(sample_many(logits, SamplingParams(top_p=0.4), 200).tolist()) == {3}  # top token always kept
    assert set(sample_many(logits, SamplingParams(top_p=0.9, top_k=2), 4000).tolist()) == {1, 3}


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.integers(-16, 16), min_size=2, max_size=12, unique=True).map(
        lambda xs: [x / 2 for x in xs]
    ),
    top_k=st.integers(-1, 12),
    top_p=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31),
)
def test_sample_lies_in_reference_support(logits, top_k, top_p, seed):
    # distinct logits: which of two tied tokens a filter keeps is an implementation choice
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    # a slightly larger top_p gives a superset nucleus, absorbing float32 rounding at the boundary
    support = expected_probs(logits, 0.8, top_k, min(1.0, top_p + 1e-4))
    out = sample(torch.tensor([logits] * 16), [params] * 16, [make_generator(seed + i) for i in range(16)])
    assert all(support[t] > 0 for t in out.token_ids)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8), (2.0, 5, 0.9)],
)
def test_empirical_frequencies_match_distribution(temperature, top_k, top_p):
    logits = [1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.7]
    n = 40_000
    drawn = sample_many(
        torch.tensor([logits]), SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), n
    )
    freq = torch.bincount(drawn, minlength=len(logits)).double() / n
    for tok, p in enumerate(expected_probs(logits, temperature, top_k, top_p)):
        assert abs(freq[tok].item() - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (tok, freq[tok].item(), p)


def test_seeded_row_is_reproducible_in_any_batch():
    vocab, steps = 64, 25
    step_logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(3))
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=1234)
    others = [
        SamplingParams(seed=7),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.5),
        SamplingParams(temperature=1.7, top_k=3, seed=99),
        SamplingParams(),
    ]

    def run(position: int, num_others: int) -> list[int]:
        params = others[:num_others]
        params.insert(position, target)
        gens = [make_generator(p.seed) for p in params]
        noise = torch.Generator().manual_seed(position * 10 + num_others)
        got = []
        for t in range(steps):
            logits = torch.randn(len(params), vocab, generator=noise) * 3
            logits[position] = step_logits[t]
            got.append(sample(logits, params, gens).token_ids[position])
        return got

    alone = run(0, 0)
    assert len(set(alone)) > 1
    for position, num_others in [(0, 5), (2, 3), (5, 5), (1, 2)]:
        assert run(position, num_others) == alone


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)
    draws = {s: sample(logits, [SamplingParams(seed=s)], [make_generator(s)]).token_ids[0] for s in range(10)}
    assert len(set(draws.values())) > 1


@pytest.mark.parametrize("temperature", [1e-3, 1e-20])
def test_temperature_near_zero_concentrates(temperature):
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    drawn = sample_many(logits, SamplingParams(temperature=temperature), 500)
    assert (drawn == 1).all()
    flat = sample_many(logits, SamplingParams(temperature=50.0), 2000)
    assert len(set(flat.tolist())) == 4


def test_logprobs_match_log_softmax_and_top_n_sorted():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(
        torch.bfloat16
    )
    params = [
        SamplingParams(logprobs=5, seed=1),
        SamplingParams(),
        SamplingParams(logprobs=0, temperature=0),
        SamplingParams(logprobs=20, top_k=3),
    ]
    out = sample(logits, params, [make_generator(p.seed) for p in params])
    ref = torch.log_softmax(logits.float(), dim=-1)
    for i, p in enumerate(params):
        if p.logprobs is None:
            assert out.logprobs[i] is None and out.top_logprobs[i] is None
            continue
        assert out.logprobs[i] == pytest.approx(ref[i, out.token_ids[i]].item(), abs=1e-6)
        if p.logprobs == 0:
            assert out.top_logprobs[i] is None
            continue
        top = out.top_logprobs[i]
        assert len(top) == p.logprobs
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in top] == ref[i].topk(p.logprobs).indices.tolist()
        assert values == pytest.approx(ref[i].topk(p.logprobs).values.tolist(), abs=1e-6)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="len"):
        sampler.sample(torch.zeros(2, 5), [SamplingParams()], [None])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_generator_serves_gpu_logits():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(6)).cuda()
    params = [SamplingParams(seed=11), SamplingParams(), SamplingParams(temperature=0)]

    def run() -> list[list[int]]:
        gens = [make_generator(p.seed) for p in params]  # CPU generators, as the engine makes them
        return [sample(logits, params, gens).token_ids for _ in range(5)]

    first, second = run(), run()
    assert [t[0] for t in first] == [t[0] for t in second]
    assert all(t[2] == logits[2].argmax().item() for t in first)
