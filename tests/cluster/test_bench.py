"""`pdserve bench`: the traffic it sends, the load generator against a real gRPC front end (over a
scripted backend, so latencies are known), the report it writes, and the goodput search."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Iterator

import pytest
from scripted_backend import ScriptedBackend  # tests/cluster is on sys.path (no __init__.py)

from cluster.bench import PROMPT_IDS, LoadSpec, Measurement, Traffic, prompt_ids, run_load
from cluster.bench_report import BenchReport, RateResult, percentile
from cluster.bench_session import BenchSession, calibrate
from cluster.grpc_server import GrpcServer
from cluster.metrics import Metrics
from placement.errors import PlacementError
from placement.goodput import bisect_goodput
from placement.profiler import DecodeFit, PrefillFit, Profile
from placement.simulator import SLO, RequestResult, attainment
from placement.workload import RequestSpec, workload_preset

TOKEN = "bench-token-1234"

# --- traffic ------------------------------------------------------------------------------------


def test_preset_traffic_is_poisson_with_scaled_lengths_and_bounded():
    full = Traffic("chatbot", num_requests=300, seed=3).at(2.0)
    half = Traffic("chatbot", num_requests=300, seed=3, length_scale=0.5).at(2.0)
    assert len(full) == len(half) == 300
    assert [r.arrival for r in full] == [r.arrival for r in half]  # same arrivals, shorter requests
    mean = lambda rs, k: sum(getattr(r, k) for r in rs) / len(rs)  # noqa: E731
    assert mean(half, "input_len") == pytest.approx(mean(full, "input_len") / 2, rel=0.05)
    assert mean(half, "output_len") == pytest.approx(mean(full, "output_len") / 2, rel=0.05)
    assert 300 / full[-1].arrival == pytest.approx(2.0, rel=0.15)
    short = Traffic("chatbot", num_requests=300, duration=20.0).at(2.0)
    assert short and all(r.arrival <= 20.0 for r in short) and len(short) < 60
    clipped = Traffic("summarization", num_requests=50, max_total_len=512).at(1.0)
    assert all(r.input_len + r.output_len <= 512 for r in clipped)


def test_trace_traffic_is_rescaled_scaled_and_clipped(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "\n".join(
            json.dumps({"arrival_time": t, "input_len": i, "output_len": o})
            for t, i, o in [(0.5, 100, 40), (1.0, 300, 10), (2.0, 900, 200)]
        )
    )
    requests = Traffic(str(trace), length_scale=0.5, max_total_len=400).at(3.0)
    assert [r.arrival for r in requests] == pytest.approx([0.25, 0.5, 1.0])  # 3 req/s on average
    assert [(r.input_len, r.output_len) for r in requests] == [(50, 20), (150, 5), (399, 1)]


def test_traffic_with_nothing_inside_its_duration_says_so():
    with pytest.raises(PlacementError, match="no requests arrive within"):
        Traffic("code", duration=1e-6).at(1.0)
    with pytest.raises(PlacementError, match="length scale"):
        workload_preset("code").scaled(0)


def test_prompts_are_seeded_random_ids_in_range():
    a, b = prompt_ids(0, 50, seed=1), prompt_ids(1, 50, seed=1)
    assert a == prompt_ids(0, 50, seed=1) and a != b and len(a) == 50
    assert all(PROMPT_IDS[0] <= t < PROMPT_IDS[1] for t in a + b)


# --- the load generator against a real gRPC front end ------------------------------------------


@pytest.fixture(scope="module")
def backend() -> ScriptedBackend:
    return ScriptedBackend(" Paris is the capital of France.")


@pytest.fixture(scope="module")
def auth_server(backend) -> Iterator[GrpcServer]:
    """The real gRPC front end over the scripted backend, on an event loop of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = GrpcServer(backend, Metrics(), port=0, auth_token=TOKEN)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    yield server
    asyncio.run_coroutine_threadsafe(server.stop(grace=0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_run_load_measures_each_request_from_its_scheduled_arrival(auth_server, backend):
    backend.started.clear()
    backend.delay = 0.02  # between tokens
    reply = len(backend.reply_ids)
    requests = [RequestSpec(0.05 * i, 8 + i, reply) for i in range(4)]
    spec = LoadSpec(f"127.0.0.1:{auth_server.port}", auth_token=TOKEN, progress=False)
    measured = run_load(requests, spec)
    assert [m.input_len for m in measured] == [8, 9, 10, 11]
    sent = [prompt_ids for _, prompt_ids, _ in backend.started]
    assert sorted(map(len, sent)) == [8, 9, 10, 11]
    for m, r in zip(measured, requests, strict=True):
        assert not m.rejected and m.error == "" and m.output_tokens == reply
        assert m.sent >= r.arrival - 1e-3  # never early
        assert m.ttft >= 0.02 and m.tpot == pytest.approx(0.02, abs=0.015)
        assert m.server["ttft"] == pytest.approx(0.01) and m.server["prefill"] == pytest.approx(0.004)
    assert {p.max_tokens for _, _, p in backend.started} == {reply}
    assert all(p.ignore_eos and p.temperature == 0 for _, _, p in backend.started)


def test_failed_and_short_requests_count_as_misses(auth_server, backend):
    backend.delay = 0.0
    reply = len(backend.reply_ids)
    target = f"127.0.0.1:{auth_server.port}"
    unauthenticated = run_load([RequestSpec(0.0, 4, reply)], LoadSpec(target, progress=False))
    assert unauthenticated[0].rejected and unauthenticated[0].error.startswith("UNAUTHENTICATED")
    # The scripted reply is shorter than asked for: the run says how many tokens came.
    short = run_load([RequestSpec(0.0, 4, reply + 5)], LoadSpec(target, TOKEN, progress=False))
    assert short[0].rejected and short[0].error == f"{reply} of {reply + 5} tokens arrived"
    assert not short[0].meets(SLO(10.0, 10.0))


def test_session_runs_rates_in_order_and_simulates_the_requests_it_sent(auth_server, backend):
    backend.delay = 0.0
    reply = len(backend.reply_ids)
    traffic = Traffic("code", num_requests=3, length_scale=0.05, max_total_len=reply + 20)
    spec = LoadSpec(f"127.0.0.1:{auth_server.port}", TOKEN, progress=False)
    report = BenchReport("c.yaml", spec.target, traffic.describe(), SLO(10.0, 10.0))
    seen: list[list[RequestSpec]] = []

    def predictor(requests, profile):
        seen.append(requests)
        return [
            RequestResult(r.arrival, r.input_len, r.output_len, r.arrival + 0.1, r.arrival + 0.2)
            for r in requests
        ]

    lines: list[str] = []
    session = BenchSession(traffic, spec, report, predictor, log=lines.append)
    # The traffic asks for its own lengths; the scripted reply is shorter, so runs count misses.
    session.rates([40.0, 20.0])
    assert [run.rate for run in report.runs] == [20.0, 40.0]
    assert [[(r.input_len, r.output_len) for r in reqs] for reqs in seen] == [
        [(m.input_len, m.output_len) for m in run.measured] for run in report.runs
    ]
    assert all(run.predicted is not None and len(run.predicted) == 3 for run in report.runs)
    assert any("simulated 100.0%" in line for line in lines)
    with pytest.raises(PlacementError, match="--calibrate needs --predict and a profile"):
        BenchSession(traffic, spec, report, predictor, profile=None, calibrate=True)


# --- the report ---------------------------------------------------------------------------------


def _measured(ttft: float, tpot: float, n: int = 11, failed: bool = False) -> Measurement:
    m = Measurement(0.0, 10, n, first_token=ttft, last_token=ttft + tpot * (n - 1), sent=0.0)
    m.output_tokens, m.rejected, m.error = n, failed, "UNAVAILABLE: gone" if failed else ""
    return m


def test_percentiles_interpolate_and_attainment_needs_both_slos():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0 and math.isnan(percentile([], 50))
    slo = SLO(ttft=1.0, tpot=0.1)
    runs = [
        _measured(0.5, 0.05),
        _measured(1.5, 0.05),
        _measured(0.5, 0.2),
        _measured(0.2, 0.01, failed=True),
    ]
    assert attainment(runs, slo) == pytest.approx(0.25)
    s = RateResult(2.0, runs, wall_s=10.0).summary(slo)
    assert (s["requests"], s["failed"]) == (4, 1)
    assert s["attainment"] == pytest.approx(0.25)
    assert s["ttft_attainment"] == pytest.approx(0.5) and s["tpot_attainment"] == pytest.approx(0.5)
    assert s["errors"] == ["UNAVAILABLE: gone"]


def test_report_writes_json_markdown_and_plots(tmp_path):
    slo = SLO(1.0, 0.1)
    report = BenchReport("c.yaml", "127.0.0.1:1", "chatbot x0.5 lengths", slo, goodput=1.5)
    for rate, ttft in ((1.0, 0.3), (2.0, 2.0)):
        predicted = [RequestResult(0.0, 10, 11, first_token=0.2, last_token=0.7)]
        report.runs.append(
            RateResult(rate, [_measured(ttft, 0.05), _measured(0.1, 0.05, failed=True)], 5.0, predicted)
        )
    paths = report.write(tmp_path)
    assert {p.name for p in paths} == {"results.json", "summary.md", "attainment.png", "latency_cdf.png"}
    assert all(p.stat().st_size > 0 for p in paths)
    data = json.loads((tmp_path / "results.json").read_text())  # strict JSON: no NaN
    assert data["goodput"] == 1.5 and data["slo"] == {"ttft_ms": 1000.0, "tpot_ms": 100.0, "attainment": 0.9}
    first = data["runs"][0]
    assert first["summary"]["attainment"] == 0.5 and first["summary"]["predicted_attainment"] == 1.0
    assert len(first["requests"]) == 2 and first["requests"][1]["error"] == "UNAVAILABLE: gone"
    md = (tmp_path / "summary.md").read_text()
    assert "| 1 | 2 | 1 | 50.0% | 100.0% |" in md and "| 2 | 2 | 1 | 0.0% | 100.0% |" in md
    assert "Goodput: 1.5 req/s" in md


def test_calibration_is_the_median_ratio_of_served_to_modelled_times():
    profile = Profile(
        "m", "cpu", 1, 1, "float32", PrefillFit(0.02, 1.5e-3, 4e-7), DecodeFit(0.03, 4e-6, 2.5e-3)
    )
    measured, predicted = [], []
    for i, (pre, dec) in enumerate([(1.2, 0.9), (1.4, 1.0), (1.5, 1.1), (9.0, 5.0)]):  # one outlier
        n = 40 + 10 * i
        m = Measurement(0.0, n, 11, first_token=1.0, last_token=1.0 + 10 * 0.05 * dec)
        m.server = {"prefill": pre * profile.prefill_time([(n, 0)])}
        measured.append(m)
        predicted.append(RequestResult(0.0, n, 11, first_token=0.5, last_token=0.5 + 10 * 0.05))
    failed = Measurement(0.0, 10, 11, rejected=True)
    prefill, decode = calibrate(profile, [*measured, failed], [*predicted, predicted[0]])
    assert prefill == pytest.approx(1.45) and decode == pytest.approx(1.05)  # medians: the outlier is ignored
    with pytest.raises(PlacementError, match="calibration needs completed requests"):
        calibrate(profile, [failed], [predicted[0]])


# --- goodput ------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.3, 1.0, 7.5, 40.0])
def test_bisection_brackets_then_narrows_to_the_threshold(threshold):
    tried: list[float] = []

    def meets(rate: float) -> bool:
        tried.append(rate)
        return rate <= threshold

    found = bisect_goodput(meets, first_guess=1.0, steps=8)
    assert found <= threshold and found == pytest.approx(threshold, rel=0.01)
    assert meets(found)


def test_a_smaller_growth_brackets_a_good_first_guess_in_fewer_probes():
    def probes(growth: float) -> list[float]:
        tried: list[float] = []
        bisect_goodput(lambda rate: tried.append(rate) or rate <= 1.2, 1.0, steps=2, growth=growth)
        return tried

    assert probes(1.5)[:2] == [1.0, 1.5]  # passes at the guess, fails one growth step above
    assert max(probes(1.5)) < max(probes(2.0))  # never probes as far past the knee
    with pytest.raises(ValueError, match="growth must be > 1"):
        bisect_goodput(lambda rate: True, 1.0, growth=1.0)


def test_bisection_gives_zero_when_nothing_passes():
    assert bisect_goodput(lambda rate: False, first_guess=1.0, max_halvings=4) == 0.0
    with pytest.raises(ValueError):
        bisect_goodput(lambda rate: True, first_guess=0.0)
