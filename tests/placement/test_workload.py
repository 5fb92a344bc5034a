"""Length distributions, workload presets, Poisson arrivals and JSON-lines traces."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from placement.errors import PlacementError
from placement.workload import (
    WORKLOAD_PRESETS,
    LengthDistribution,
    RequestSpec,
    at_rate,
    load_trace,
    poisson_requests,
    scale_lengths,
    trace_statistics,
    workload_preset,
)


def test_sampling_reproduces_mean_and_median():
    dist = LengthDistribution(mean=500, median=300, minimum=1, maximum=10**7)
    samples = dist.sample(random.Random(1), 20_000)
    assert statistics.fmean(samples) == pytest.approx(500, rel=0.04)
    assert statistics.median(samples) == pytest.approx(300, rel=0.03)
    assert all(isinstance(x, int) for x in samples)


def test_sampling_respects_clipping():
    dist = LengthDistribution(mean=500, median=300, minimum=100, maximum=800)
    samples = dist.sample(random.Random(2), 20_000)
    assert min(samples) == 100 and max(samples) == 800  # both bounds are hit, none exceeded
    assert statistics.median(samples) == pytest.approx(300, rel=0.03)  # clipping keeps the median


def test_equal_mean_and_median_is_a_constant():
    assert set(LengthDistribution(mean=64, median=64).sample(random.Random(0), 100)) == {64}


def test_sampling_is_deterministic_per_rng_seed():
    dist = LengthDistribution(mean=200, median=120)
    assert dist.sample(random.Random(7), 50) == dist.sample(random.Random(7), 50)
    assert dist.sample(random.Random(7), 50) != dist.sample(random.Random(8), 50)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean": 100, "median": 200}, "mean >= median > 0"),
        ({"mean": 100, "median": 0}, "mean >= median > 0"),
        ({"mean": float("inf"), "median": 10}, "mean >= median > 0"),
        ({"mean": 100, "median": 50, "minimum": 0}, "minimum must be an integer >= 1"),
        (
            {"mean": 100, "median": 50, "minimum": 10, "maximum": 5},
            r"maximum must be an integer >= minimum \(10\)",
        ),
    ],
)
def test_length_distribution_validation(kwargs, message):
    with pytest.raises(PlacementError, match=message):
        LengthDistribution(**kwargs)


def test_presets_are_shaped_like_distserve_applications():
    assert set(WORKLOAD_PRESETS) == {"chatbot", "code", "summarization"}
    rng = random.Random(0)
    means = {
        name: (statistics.fmean(w.input.sample(rng, 5000)), statistics.fmean(w.output.sample(rng, 5000)))
        for name, w in WORKLOAD_PRESETS.items()
    }
    chat_in, chat_out = means["chatbot"]
    assert 150 < chat_in < 400 and 150 < chat_out < 300  # ShareGPT: a few hundred each way
    code_in, code_out = means["code"]
    assert 100 < code_in < 250 and 50 < code_out < 200  # HumanEval: short prompt, short completion
    summ_in, summ_out = means["summarization"]
    assert 1900 <= summ_in <= 2048 and summ_out < 300  # LongBench cut to 2k: long in, short out
    assert summ_in / summ_out > 5 > chat_in / chat_out
    for w in WORKLOAD_PRESETS.values():
        assert w.source  # every preset says where its numbers come from


def test_workload_preset_lookup():
    assert workload_preset("Chatbot") is WORKLOAD_PRESETS["chatbot"]
    with pytest.raises(
        PlacementError, match="unknown workload 'chat'; known workloads: chatbot, code, summarization"
    ):
        workload_preset("chat")


def test_poisson_mean_gap_is_one_over_rate():
    requests = poisson_requests(WORKLOAD_PRESETS["chatbot"], rate=4.0, num_requests=20_000, seed=3)
    arrivals = [r.arrival for r in requests]
    gaps = [b - a for a, b in zip([0.0, *arrivals], arrivals, strict=False)]
    assert arrivals[0] > 0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: sd == mean


def test_poisson_is_deterministic_per_seed():
    workload = WORKLOAD_PRESETS["code"]
    first = poisson_requests(workload, rate=2.0, num_requests=200, seed=5)
    assert first == poisson_requests(workload, rate=2.0, num_requests=200, seed=5)
    assert first != poisson_requests(workload, rate=2.0, num_requests=200, seed=6)
    # Arrival times depend on the seed only, not on the workload.
    other = poisson_requests(WORKLOAD_PRESETS["summarization"], rate=2.0, num_requests=200, seed=5)
    assert [r.arrival for r in other] == [r.arrival for r in first]


def test_max_total_len_caps_each_request():
    requests = poisson_requests(WORKLOAD_PRESETS["summarization"], 1.0, 2000, seed=0, max_total_len=2000)
    assert all(r.input_len + r.output_len <= 2000 for r in requests)
    assert all(r.input_len >= 1 and r.output_len >= 1 for r in requests)
    assert max(r.input_len + r.output_len for r in requests) == 2000  # capped, not shrunk wholesale
    tiny = poisson_requests(WORKLOAD_PRESETS["chatbot"], 1.0, 500, seed=0, max_total_len=2)
    assert {(r.input_len, r.output_len) for r in tiny} == {(1, 1)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0.0}, "rate must be positive"),
        ({"rate": -1.0}, "rate must be positive"),
        ({"num_requests": -1}, "number of requests must be >= 0"),
        ({"max_total_len": 1}, "max_total_len must be >= 2"),
    ],
)
def test_poisson_rejects_bad_arguments(kwargs, message):
    args = {"rate": 1.0, "num_requests": 10, **kwargs}
    with pytest.raises(PlacementError, match=message):
        poisson_requests(WORKLOAD_PRESETS["chatbot"], **args)


def _write_trace(path, entries):
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n")


def test_trace_round_trip(tmp_path):
    requests = poisson_requests(WORKLOAD_PRESETS["chatbot"], rate=3.0, num_requests=50, seed=1)
    path = tmp_path / "trace.jsonl"
    _write_trace(
        path,
        [{"arrival_time": r.arrival, "input_len": r.input_len, "output_len": r.output_len} for r in requests],
    )
    assert load_trace(path) == requests
    assert load_trace(str(path)) == requests


def test_trace_allows_blank_lines_ties_and_extra_keys(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text(
        '\n{"arrival_time": 0, "input_len": 5, "output_len": 7, "id": "a"}\n'
        "   \n"
        '{"arrival_time": 0, "input_len": 6, "output_len": 1}\n'
        '{"arrival_time": 1.5, "input_len": 8, "output_len": 2}\n\n'
    )
    assert load_trace(path) == [RequestSpec(0.0, 5, 7), RequestSpec(0.0, 6, 1), RequestSpec(1.5, 8, 2)]


GOOD = '{"arrival_time": 1.0, "input_len": 10, "output_len": 5}'


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 10, 5]", "expected an object with keys arrival_time, input_len, output_len"),
        ('{"arrival_time": 2.0, "input_len": 10}', "missing 'output_len'"),
        ('{"input_len": 10, "output_len": 5}', "missing 'arrival_time'"),
        ('{"arrival_time": "2", "input_len": 10, "output_len": 5}', "arrival_time must be a number"),
        ('{"arrival_time": 2.0, "input_len": 10.5, "output_len": 5}', "input_len must be an integer"),
        ('{"arrival_time": 2.0, "input_len": 10, "output_len": true}', "output_len must be an integer"),
        ('{"arrival_time": 2.0, "input_len": 0, "output_len": 5}', "input_len must be positive, got 0"),
        ('{"arrival_time": 2.0, "input_len": 10, "output_len": -3}', "output_len must be positive, got -3"),
        ('{"arrival_time": 0.5, "input_len": 10, "output_len": 5}', "before the previous request's 1.0"),
        ('{"arrival_time": -1, "input_len": 10, "output_len": 5}', "arrival_time must be >= 0"),
    ],
)
def test_malformed_trace_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{bad_line}\n{GOOD}\n")
    with pytest.raises(PlacementError, match=message) as info:
        load_trace(path)
    assert str(info.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_trace_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(PlacementError, match="no requests") as info:
        load_trace(path)
    assert str(path) in str(info.value)


def test_missing_trace_file_is_a_placement_error(tmp_path):
    with pytest.raises(PlacementError, match="cannot read trace"):
        load_trace(tmp_path / "absent.jsonl")


def test_at_rate_rescales_arrivals():
    requests = poisson_requests(WORKLOAD_PRESETS["code"], rate=2.0, num_requests=1000, seed=4)
    faster = at_rate(requests, 8.0)
    assert trace_statistics(faster)["rate"] == pytest.approx(8.0)
    ratio = requests[-1].arrival / faster[-1].arrival
    assert ratio == pytest.approx(8.0 / trace_statistics(requests)["rate"]) and ratio > 1
    for before, after in zip(requests, faster, strict=True):
        assert after.arrival == pytest.approx(before.arrival / ratio)
        assert (after.input_len, after.output_len) == (before.input_len, before.output_len)
    with pytest.raises(PlacementError, match="rate must be positive"):
        at_rate(requests, 0.0)
    with pytest.raises(PlacementError, match="all arrive at t = 0"):
        at_rate([RequestSpec(0.0, 3, 4), RequestSpec(0.0, 5, 6)], 1.0)


def test_scale_lengths_keeps_arrivals_and_clips_to_the_context():
    requests = [RequestSpec(0.5, 100, 40), RequestSpec(1.0, 3, 1), RequestSpec(2.0, 900, 300)]
    half = scale_lengths(requests, 0.5, max_total_len=400)
    assert [(r.arrival, r.input_len, r.output_len) for r in half] == [
        (0.5, 50, 20),
        (1.0, 2, 1),  # at least one token each
        (2.0, 399, 1),  # 450 + 150 clipped to the 400-token context
    ]
    with pytest.raises(PlacementError, match="length scale must be a positive number"):
        scale_lengths(requests, 0.0)


def test_trace_statistics():
    requests = [RequestSpec(0.5, 10, 1), RequestSpec(1.0, 20, 3), RequestSpec(2.0, 60, 8)]
    stats = trace_statistics(requests)
    assert stats == {
        "count": 3,
        "duration": 2.0,
        "rate": 1.5,
        "mean_input_len": 30.0,
        "median_input_len": 20,
        "mean_output_len": 4.0,
        "median_output_len": 3,
    }
    with pytest.raises(PlacementError, match="no requests"):
        trace_statistics([])
