"""The placement search and the plan `pdserve serve` runs: ranked candidates within the GPU
budget that meet the SLOs, instance counts that follow the rate, clear errors for what cannot be
planned or served."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import yaml

from cluster.config import config_from_dict
from placement import plan as planning
from placement.errors import PlacementError

SMALL = {
    "model": {"name": "dummy:llama-3.1-8b", "device": "cuda"},
    "slo": {"ttft_ms": 400, "tpot_ms": 100, "attainment": 0.9},
    "decode": {"max_batch": 32},
    "placement": {
        "mode": "auto",
        "gpu": "h100-80gb",
        "nodes": 1,
        "gpus_per_node": 4,
        "workload": "chatbot",
        "num_requests": 400,
    },
}


def config(**placement):
    data = {**SMALL, "placement": {**SMALL["placement"], **placement}}
    return config_from_dict(data)


@pytest.fixture(scope="module")
def as_high_as_possible():
    cfg = config()
    return cfg, planning.plan(cfg)


def test_the_plan_ranks_candidates_within_budget_and_the_best_meets_the_slos(as_high_as_possible):
    cfg, result = as_high_as_possible
    best = result.candidates[0]
    assert all(c.gpus <= 4 for c in result.candidates)
    assert best.attainment >= 0.9 and best.goodput > 0
    per_gpu = [c.goodput_per_gpu for c in result.candidates if c.attainment >= 0.9]
    assert per_gpu == sorted(per_gpu, reverse=True)
    assert {c.kind for c in result.candidates} <= {"high_affinity", "low_affinity", "colocated"}
    assert result.num_simulations > 0


def test_a_target_rate_sizes_the_pools_and_a_higher_rate_needs_more(as_high_as_possible):
    cfg, result = as_high_as_possible
    rate = result.candidates[0].goodput / 4
    low = planning.plan(config(rate=rate, gpus_per_node=8)).candidates[0]
    high = planning.plan(config(rate=rate * 3, gpus_per_node=8)).candidates[0]
    assert low.goodput >= rate * 0.99 and high.goodput >= rate * 3 * 0.99
    assert high.gpus > low.gpus
    assert low.attainment >= 0.9


def test_the_plan_file_round_trips_and_serve_runs_what_it_can(tmp_path, as_high_as_possible):
    cfg, result = as_high_as_possible
    path = tmp_path / "plan.yaml"
    planning.save_plan(path, cfg, result)
    chosen = planning.load_plan(path)["chosen"]
    assert chosen == yaml.safe_load(path.read_text())["ranked"][0]
    one_gpu = {**chosen, "kind": "high_affinity", "colocated": None}
    one_gpu["prefill"] = {"instances": 2, "tp": 1, "pp": 1}
    one_gpu["decode"] = {"instances": 3, "tp": 1, "pp": 1}
    applied = planning.apply_plan(cfg, one_gpu)
    assert (applied.prefill.instances, applied.decode.instances) == (2, 3)
    assert list(applied.pools) == ["prefill", "decode"] and not applied.is_colocated
    assert applied.kv_transfer.codec == chosen["codec"]
    sharded = planning.apply_plan(cfg, {**one_gpu, "decode": {"instances": 1, "tp": 2, "pp": 1}})
    assert (sharded.decode.tp, sharded.decode.pp, sharded.prefill.tp) == (2, 1, 1)
    sharded.check_servable()  # the KV is re-sharded in transit: serve runs it
    colocated = planning.apply_plan(cfg, {**one_gpu, "colocated": {"instances": 4, "tp": 1, "pp": 1}})
    assert list(colocated.pools) == ["colocated"] and colocated.colocated.instances == 4  # serve runs it
    assert planning.configured(colocated).describe() == "colocated 4x" + str(planning.Parallelism(1, 1))
    assert not planning.apply_plan(colocated, one_gpu).is_colocated  # a disaggregated plan replaces it
    (tmp_path / "bad.yaml").write_text("format: 7\n")
    with pytest.raises(PlacementError, match="not a pdserve plan file"):
        planning.load_plan(tmp_path / "bad.yaml")


def test_weights_that_fit_no_device_say_so():
    cfg = config_from_dict(
        {
            **SMALL,
            "model": {"name": "dummy:llama-3.1-70b", "device": "cuda"},
            "placement": {**SMALL["placement"], "gpu": "l4", "gpus_per_node": 1},
        }
    )
    with pytest.raises(PlacementError, match=r"no feasible plan:(.|\n)*weights need .* GiB per device"):
        planning.plan(cfg)


def test_placement_length_scale_scales_the_planned_workload(tmp_path):
    full = planning.search_space(config())
    half = planning.search_space(config(length_scale=0.5))
    mean = lambda space, key: sum(getattr(r, key) for r in space.requests) / len(space.requests)  # noqa: E731
    for key in ("input_len", "output_len"):
        assert mean(half, key) == pytest.approx(mean(full, key) / 2, rel=0.05)
    trace = tmp_path / "long.jsonl"  # longer than the context unscaled, inside it at a quarter
    trace.write_text('{"arrival_time": 1, "input_len": 200000, "output_len": 100}\n')
    with pytest.raises(PlacementError, match="more tokens than the model's context"):
        planning.search_space(config(trace=str(trace)))
    (request,) = planning.search_space(config(trace=str(trace), length_scale=0.25)).requests
    assert (request.input_len, request.output_len) == (50000, 25)
    with pytest.raises(Exception, match="placement.length_scale: must be a positive number"):
        config(length_scale=-1)


def test_slos_no_configuration_meets_say_which():
    cfg = replace(config(), slo=replace(config().slo, ttft_ms=0.5))
    with pytest.raises(PlacementError, match="no configuration meets TTFT <= 0.5 ms"):
        planning.plan(cfg)


def test_unknown_gpu_and_malformed_trace_are_clear(tmp_path):
    with pytest.raises(PlacementError, match="unknown GPU kind 'v100'"):
        planning.plan(config(gpu="v100"))
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"arrival_time": 0.5, "input_len": 10, "output_len": 5}\nnot json\n')
    with pytest.raises(PlacementError, match="trace.jsonl:2"):
        planning.plan(config(trace=str(trace)))


def test_pdserve_plan_prints_the_table_and_writes_the_plan(tmp_path):
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(
        yaml.safe_dump({**SMALL, "placement": {**SMALL["placement"], "algorithm": "high_affinity"}})
    )
    out = tmp_path / "plan.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "plan", "--config", str(cfg), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "| 1 | prefill" in run.stdout and "goodput/GPU" in run.stdout
    assert planning.load_plan(out)["chosen"]["kind"] == "high_affinity"
    cfg.write_text(yaml.safe_dump({**SMALL, "placement": {**SMALL["placement"], "gpu": "tpu"}}))
    run = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "plan", "--config", str(cfg)], capture_output=True, text=True
    )
    assert run.returncode == 1 and "unknown GPU kind 'tpu'" in run.stderr
