"""The profiler: fits recover the latency forms' coefficients (exactly, under noise, never negative),
the real engine's measured step times are ordered as the work is, and profile files round-trip or
are refused with the file's name."""

from __future__ import annotations

import dataclasses
import json
import re
import statistics

import numpy as np
import pytest

from cluster.config import ClusterConfig, DecodeSection, ModelSection, PrefillSection
from placement.errors import PlacementError
from placement.profiler import DecodeFit, PrefillFit, Profile, _interleaved, fit, measure, profile_engine

PREFILL = PrefillFit(a=0.02, b=1.5e-3, c=4e-7)
DECODE = DecodeFit(a=0.03, b=4e-6, c=2.5e-3)
PREFILL_SHAPES = [[(n, 0)] * k for n in (16, 64, 256, 1024) for k in (1, 2, 4)] + [
    [(n, p)] for n in (128, 512) for p in (512, 2048)
]
DECODE_SHAPES = [[c] * b for c in (64, 512, 2048) for b in (1, 8, 32, 128)]


def synthetic(prefill_time, decode_time, noise: float = 0.0) -> dict:
    """Samples of the given step-time functions, each scaled by a uniform factor in 1 +- noise."""
    rng = np.random.default_rng(0)

    def jitter(t: float) -> float:
        return t * (1 + rng.uniform(-noise, noise))

    return {
        "prefill": [
            {"chunks": [list(c) for c in s], "seconds": jitter(prefill_time(s))} for s in PREFILL_SHAPES
        ],
        "decode": [{"contexts": s, "seconds": jitter(decode_time(s))} for s in DECODE_SHAPES],
    }


def coefficients(*fits) -> np.ndarray:
    return np.array([[f.a, f.b, f.c] for f in fits]).ravel()


def test_fit_recovers_exact_coefficients():
    prefill, decode, errors = fit(synthetic(PREFILL.time, DECODE.time))
    np.testing.assert_allclose(coefficients(prefill, decode), coefficients(PREFILL, DECODE), rtol=1e-9)
    assert max(e["max"] for e in errors.values()) < 1e-9


def test_fit_under_three_percent_noise():
    prefill, decode, errors = fit(synthetic(PREFILL.time, DECODE.time, noise=0.03))
    np.testing.assert_allclose(coefficients(prefill, decode), coefficients(PREFILL, DECODE), rtol=0.08)
    for shape in PREFILL_SHAPES:
        assert prefill.time(shape) == pytest.approx(PREFILL.time(shape), rel=0.03)
    for shape in DECODE_SHAPES:
        assert decode.time(shape) == pytest.approx(DECODE.time(shape), rel=0.03)
    assert all(e["median"] < 0.03 and e["max"] < 0.06 for e in errors.values())


def test_fit_never_returns_negative_coefficients():
    # Data of the forms with a negative quadratic term (prefill) and a negative intercept (decode):
    # the unconstrained fit would return them exactly.
    def prefill_time(chunks):
        return 0.05 + 1e-3 * sum(n for n, _ in chunks) - 1e-7 * sum(n * (n + 2 * p) for n, p in chunks)

    def decode_time(contexts):
        return -1e-3 + 4e-6 * sum(contexts) + 2.5e-3 * len(contexts)

    prefill, decode, errors = fit(synthetic(prefill_time, decode_time))
    assert (coefficients(prefill, decode) >= 0).all()
    assert prefill.c == 0 and decode.a == 0  # the term the data pushes negative is dropped
    assert errors["prefill"]["median"] < 0.3 and errors["decode"]["median"] < 0.1  # the best of the rest


def test_fit_refuses_samples_it_cannot_fit():
    with pytest.raises(PlacementError, match="no decode measurements"):
        fit({"prefill": [{"chunks": [[8, 0]], "seconds": 0.1}], "decode": []})
    with pytest.raises(PlacementError, match=r"samples\.prefill\[0\]"):
        fit({"prefill": [{"chunks": [[8, 0]], "seconds": 0.0}], "decode": [{"contexts": [9], "seconds": 1}]})


def test_latency_model_interface():
    profile = Profile("m", "cpu", 1, 1, "float32", PREFILL, DECODE)
    assert profile.prefill_time([(100, 0), (50, 200)]) == pytest.approx(
        0.02 + 1.5e-3 * 150 + 4e-7 * (100 * 100 + 50 * 450)
    )
    assert profile.decode_time(3, 60) == pytest.approx(0.03 + 4e-6 * 60 + 2.5e-3 * 3)
    assert profile.decode_time(3, 60) == pytest.approx(DECODE.time([10, 20, 30]))
    # The fixed per-step cost alone, which the simulator subtracts once from a mixed step.
    assert profile.prefill_time([]) == PREFILL.a and profile.decode_time(0, 0) == DECODE.a
    with pytest.raises(PlacementError, match=r"PrefillFit\.b must be >= 0"):
        PrefillFit(0.0, -1.0, 0.0)


def test_scaled_profile_stretches_each_phase_by_its_factor():
    profile = Profile("m", "cpu", 1, 1, "float32", PREFILL, DECODE)
    scaled = profile.scaled(prefill=1.5, decode=0.8)
    chunks = [(100, 0), (50, 200)]
    assert scaled.prefill_time(chunks) == pytest.approx(1.5 * profile.prefill_time(chunks))
    assert scaled.decode_time(7, 900) == pytest.approx(0.8 * profile.decode_time(7, 900))
    assert (scaled.hardware, scaled.tp) == (profile.hardware, profile.tp)
    with pytest.raises(PlacementError, match="calibration factors must be positive"):
        profile.scaled(0.0, 1.0)


# --- the real engine ------------------------------------------------------------------------------

TINY = ClusterConfig(
    model=ModelSection(name="smollm2-135m", dtype="float32", device="cpu"),
    prefill=PrefillSection(max_num_batched_tokens=256, chunk_size=128),
    decode=DecodeSection(max_batch=16),
)


@pytest.fixture(scope="module")
def tiny_profile() -> Profile:
    return profile_engine(
        TINY,
        prefill_lengths=(8, 32, 128),
        prefill_batches=(1, 2),
        prefill_chunked=((32, 128),),
        decode_batches=(1, 16),
        decode_contexts=(16, 256),
        repeats=3,
        progress=False,
    )


def measured(samples: list[dict], key: str, shape: list) -> float:
    (seconds,) = [s["seconds"] for s in samples if s[key] == shape]
    return seconds


def test_measure_and_fit_on_the_embedded_model(tiny_profile):
    profile = tiny_profile
    assert (profile.model, profile.hardware, profile.dtype, profile.tp, profile.pp) == (
        "smollm2-135m",
        "cpu",
        "float32",
        1,
        1,
    )
    prefill, decode = profile.samples["prefill"], profile.samples["decode"]
    assert [s["chunks"] for s in prefill] == [
        [[8, 0]],
        [[8, 0]] * 2,
        [[32, 0]],
        [[32, 0]] * 2,
        [[128, 0]],
        [[128, 0]] * 2,
        [[32, 128]],
    ]
    assert [s["contexts"] for s in decode] == [[16], [16] * 16, [256], [256] * 16]
    assert all(len(s["runs"]) == 3 and s["seconds"] > 0 for s in prefill + decode)
    assert profile.samples["environment"]["threads"] == {"prefill": 1, "decode": 1}

    # Measurements ordered as the work: 32x the tokens at least twice the time, and so on.
    assert measured(prefill, "chunks", [[128, 0]] * 2) > 2 * measured(prefill, "chunks", [[8, 0]])
    assert measured(prefill, "chunks", [[128, 0]]) > measured(prefill, "chunks", [[32, 0]])
    assert measured(decode, "contexts", [256] * 16) > measured(decode, "contexts", [16])
    assert measured(decode, "contexts", [16] * 16) > measured(decode, "contexts", [16])

    # The fits follow: longer prompts and bigger batches cost more, within CPU noise of the data.
    fitted = profile.prefill
    assert fitted.time([(128, 0)] * 2) > 2 * fitted.time([(8, 0)])
    assert fitted.time([(32, 128)]) >= fitted.time([(32, 0)])
    assert profile.decode_time(16, 16 * 256) > profile.decode_time(1, 256) > profile.decode_time(1, 16) * 0.99
    assert profile.fit_error["prefill"]["median"] < 0.25
    assert profile.fit_error["decode"]["median"] < 0.25
    assert fit(profile.samples) == (profile.prefill, profile.decode, profile.fit_error)

    # Contention: a few shapes timed alone and beside a co-running engine of each phase.
    contention = profile.samples["contention"]
    assert contention["runs"]["shapes"] == {
        "prefill": [[1, 32, 0], [1, 128, 0]],
        "decode": [[1, 256], [16, 256]],
    }
    for key in ("alone", "beside prefill", "beside decode"):
        times = contention["runs"][key]
        assert (
            len(times["prefill"]) == len(times["decode"]) == 2 and min(times["prefill"] + times["decode"]) > 0
        )
    assert profile.contention == contention["factors"]
    assert {(p, o) for p, row in profile.contention.items() for o in row} == {
        (p, o) for p in ("prefill", "decode") for o in ("prefill", "decode")
    }
    assert all(factor >= 1.0 for row in profile.contention.values() for factor in row.values())
    ratio = statistics.median(
        b / a
        for b, a in zip(
            contention["runs"]["beside decode"]["decode"], contention["runs"]["alone"]["decode"], strict=True
        )
    )
    assert profile.slowdown("decode", "decode") == pytest.approx(max(1.0, ratio), abs=1e-4)


def test_measure_refuses_a_grid_the_config_cannot_run():
    with pytest.raises(PlacementError, match=r"prefill_lengths: \[512\] out of range"):
        measure(TINY, prefill_lengths=(64, 512), progress=False)
    with pytest.raises(PlacementError, match="repeats"):
        measure(TINY, repeats=0, progress=False)


# --- the profile file -----------------------------------------------------------------------------


@pytest.fixture
def profile() -> Profile:
    samples = synthetic(PREFILL.time, DECODE.time, noise=0.03)
    prefill, decode, errors = fit(samples)
    return Profile(
        "smollm2-135m", "h100-80gb", 2, 1, "bfloat16", prefill, decode, samples, "2025-01-31", errors
    )


def test_save_load_round_trip(profile, tmp_path):
    path = tmp_path / "profile.json"
    profile.save(path)
    assert json.loads(path.read_text())["format"] == 1
    assert Profile.load(path) == profile
    shared = dataclasses.replace(profile, contention={"decode": {"decode": 1.6, "prefill": 1.2}})
    shared.save(path)
    assert Profile.load(path) == shared
    assert (shared.slowdown("decode", "decode"), shared.slowdown("prefill", "decode")) == (1.6, 1.0)


def test_a_profile_without_contention_loads_with_none_and_bad_factors_are_refused(profile, tmp_path):
    path = tmp_path / "profile.json"
    data = profile.to_dict()
    del data["contention"]  # a file from before contention was measured
    path.write_text(json.dumps(data))
    assert Profile.load(path).slowdown("decode", "decode") == 1.0
    for bad, problem in (
        ({"decode": {"decode": 0}}, r"contention\.decode\.decode must be a factor in \(0, 100\), got 0"),
        ({"decode": {"attention": 1.5}}, r"contention\.decode\.attention must be a factor"),
        ({"sampling": {}}, r"contention: expected \{phase: \{phase: factor\}\}"),
    ):
        path.write_text(json.dumps({**data, "contention": bad}))
        with pytest.raises(PlacementError, match=problem):
            Profile.load(path)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d: d.update(format=2), "profile format 2 is not supported"),
        (lambda d: d.pop("format"), "profile format None is not supported"),
        (lambda d: d.pop("decode"), "missing key 'decode'"),
        (lambda d: d.update(tp="two"), "tp must be a JSON int"),
        (lambda d: d.update(pp=0), "pp must be >= 1"),
        (lambda d: d["prefill"].update(c=-1e-9), r"prefill: PrefillFit\.c must be >= 0"),
        (lambda d: d["decode"].pop("b"), "decode must have exactly the coefficients a, b, c"),
        (lambda d: d.update(extra=1), "unknown key 'extra'"),
    ],
)
def test_load_refuses_a_wrong_profile(profile, tmp_path, edit, problem):
    path = tmp_path / "profile.json"
    data = profile.to_dict()
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(PlacementError, match=re.escape(str(path)) + ": " + problem):
        Profile.load(path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_load_refuses_a_malformed_file(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(PlacementError, match=re.escape(str(path)) + ": not a profile"):
        Profile.load(path)
    with pytest.raises(PlacementError, match=re.escape(str(tmp_path / "missing.json"))):
        Profile.load(tmp_path / "missing.json")


def test_timings_are_taken_in_passes_so_a_burst_spoils_one_of_each_shape():
    shapes = [(1,), (2,), (3,)]
    calls: list[int] = []
    slow_calls = {1, 2, 3}  # something else ran on the machine for three timings in a row

    def step(shape: tuple) -> float:
        calls.append(shape[0])
        return 10.0 if len(calls) - 1 in slow_calls else float(shape[0])

    runs = _interleaved(shapes, 3, step)
    assert calls == [1, 2, 3] * 3  # three passes over the grid
    assert [statistics.median(r) for r in runs] == [1.0, 2.0, 3.0]  # the burst is voted out
    assert all(len(r) == 3 for r in runs)
