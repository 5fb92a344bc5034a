"""Deployment config files: the shipped ones load, and every kind of mistake is rejected with the
key's dotted path and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import ClusterConfig, ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert isinstance(config, ClusterConfig)
    # Round trip: what check-config prints loads back to the same config.
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


def test_local_config_is_the_cpu_deployment():
    config = load_config(CONFIGS / "local.yaml")
    assert config.model.name == "smollm2-135m" and config.model.device == "cpu"
    assert (config.prefill.instances, config.decode.instances) == (1, 1)
    assert config.prefill.cpus == config.decode.cpus == 1
    assert config.prefill.kv_cache_memory == 256 << 20 and config.kv_transfer.codec == "none"
    assert config.num_gpus == 0


def test_eight_gpu_example_uses_eight_gpus():
    config = load_config(CONFIGS / "examples" / "llama-3.1-8b-8xh100.yaml")
    assert config.num_gpus == 8 and config.prefill.gpus_per_instance == 2


def test_defaults_fill_what_is_left_out():
    config = config_from_dict({"slo": {"ttft_ms": 300}})
    assert config.slo.ttft_ms == 300.0 and config.slo.tpot_ms == 200.0
    assert config.server.grpc_port == 50051 and config.server.http_port == 8000
    assert config_from_dict({}) == ClusterConfig()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prefil": {}}, r"^prefil: unknown key; allowed here: model, slo, prefill, decode"),
        ({"prefill": {"instancs": 2}}, r"^prefill\.instancs: unknown key; allowed here: instances, tp, pp"),
        ({"prefill": {"tp": "two"}}, r"^prefill\.tp: expected an integer, got 'two' \(str\)"),
        ({"prefill": {"tp": True}}, r"^prefill\.tp: expected an integer, got True"),
        ({"prefill": {"tp": 3}}, r"^prefill\.tp: tensor parallel must be a power of two >= 1, got 3"),
        ({"decode": {"instances": 0}}, r"^decode\.instances: must be >= 1, got 0"),
        ({"decode": {"max_batch": -1}}, r"^decode\.max_batch: must be >= 1"),
        ({"slo": {"attainment": 1.5}}, r"^slo\.attainment: must be in \(0, 1\], got 1\.5"),
        ({"slo": {"ttft_ms": "fast"}}, r"^slo\.ttft_ms: expected a number, got 'fast'"),
        ({"slo": {"tpot_ms": 0}}, r"^slo\.tpot_ms: must be > 0 milliseconds"),
        (
            {"model": {"dtype": "fp64"}},
            r"^model\.dtype: 'fp64' is not one of: auto, float32, bfloat16, float16",
        ),
        ({"model": None}, r"^model: expected a mapping of keys, got nothing \(null\)"),
        ({"model": {"name": " "}}, r"^model\.name: must name a model"),
        (
            {"kv_transfer": {"codec": "int3"}},
            r"^kv_transfer\.codec: 'int3' is not one of: none, fp8, int8, int4",
        ),
        ({"kv_transfer": {"transport": "rdma"}}, r"^kv_transfer\.transport: 'rdma' is not one of"),
        ({"kv_transfer": {"layerwise": "yes"}}, r"^kv_transfer\.layerwise: expected true or false"),
        ({"decode": {"kv_cache_memory": "lots"}}, r"^decode\.kv_cache_memory: expected a size in bytes"),
        ({"server": {"grpc_port": 70000}}, r"^server\.grpc_port: must be a TCP port"),
        ({"server": {"http_port": 50051}}, r"^server\.http_port: must differ from grpc_port \(50051\)"),
        ({"server": {"auth_token": "short"}}, r"^server\.auth_token: use 8 characters or more"),
        (
            {"prefill": {"chunk_size": 4096, "max_num_batched_tokens": 1024}},
            r"^prefill\.max_num_batched_tokens: the batch token budget \(1024\) must hold at least one chunk",
        ),
        (
            {"model": {"device": "cuda"}, "prefill": {"instances": 4, "tp": 2}, "placement": {"max_gpus": 8}},
            r"^placement\.max_gpus: the pools ask for 9 GPUs, more than the budget of 8",
        ),
        ([1, 2], r"^the top level: expected a mapping of keys, got \[1, 2\]"),
    ],
)
def test_each_mistake_names_its_key_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_sizes_take_units():
    config = config_from_dict({"decode": {"kv_cache_memory": "1.5GiB"}, "prefill": {"kv_cache_memory": 4096}})
    assert config.decode.kv_cache_memory == 3 << 29 and config.prefill.kv_cache_memory == 4096


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill:\n  tp: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("decode:\n  max_batch: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: decode\.max_batch: must be >= 1"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read the config file"):
        load_config(tmp_path / "missing.yaml")


def test_check_config_command(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "check-config", str(CONFIGS / "local.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["decode"]["kv_cache_memory"] == 512 << 20
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  max_queue: 0\n")
    fail = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fail.returncode == 1
    assert "server.max_queue: must be >= 1" in fail.stderr and "Traceback" not in fail.stderr


def test_ray_cluster_file_passes_rays_own_schema():
    import json

    import jsonschema
    import ray.autoscaler
    from jsonschema import ValidationError

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())

    def validate_config(config: dict) -> None:  # what `ray up` checks the file against
        jsonschema.validate(config, schema)

    cluster = yaml.safe_load((CONFIGS.parent / "scripts" / "cluster.yaml").read_text())
    validate_config(cluster)
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {}
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in types.values())
    assert any("pip install -e ." in command for command in cluster["setup_commands"])
    assert any("ray start --head" in command for command in cluster["head_start_ray_commands"])
    with pytest.raises(ValidationError):  # the schema is strict: a typo would not pass
        validate_config({**cluster, "max_worker": 4})


def test_serve_refuses_parallel_pools_only_with_a_transport_that_cannot_reach_every_rank():
    base = {"model": {"device": "cpu"}, "decode": {"tp": 2}}
    config_from_dict(base).check_servable()  # auto: shm or gRPC to each rank
    config_from_dict({**base, "kv_transfer": {"transport": "grpc"}}).check_servable()
    config = config_from_dict({**base, "kv_transfer": {"transport": "local"}})  # a valid file
    with pytest.raises(ConfigError, match=r"^kv_transfer\.transport: decode\.tp=2 x decode\.pp=1 .*'local'"):
        config.check_servable()
    config_from_dict({"model": {"device": "cpu"}, "colocated": {"instances": 2, "pp": 2}}).check_servable()


def test_each_rank_of_an_instance_gets_a_bundle_packed_on_one_node_unless_it_cannot_be():
    from cluster.rank_actors import instance_bundles

    cpu = config_from_dict({"model": {"device": "cpu"}, "prefill": {"tp": 2, "cpus": 1.0}})
    assert instance_bundles(cpu, "prefill") == ([{"CPU": 0.5}, {"CPU": 0.5}], "STRICT_PACK")
    assert instance_bundles(cpu, "decode") == ([{"CPU": cpu.decode.cpus}], "STRICT_PACK")
    gpu = {"model": {"device": "cuda"}, "placement": {"gpus_per_node": 8}}
    on_a_node = config_from_dict({**gpu, "decode": {"tp": 4, "pp": 2, "cpus": 8.0}})
    assert instance_bundles(on_a_node, "decode") == ([{"CPU": 1.0, "GPU": 1}] * 8, "STRICT_PACK")
    across = config_from_dict({**gpu, "decode": {"tp": 8, "pp": 2, "cpus": 16.0}})  # 16 GPUs: two nodes
    assert instance_bundles(across, "decode") == ([{"CPU": 1.0, "GPU": 1}] * 16, "PACK")
