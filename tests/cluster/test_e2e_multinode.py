"""Pipeline stages of one instance on two Ray nodes (two raylets on this machine, in a process of
their own: tests/cluster/multinode_serve.py). The rank on the second node is a Ray actor that
connects back to rank 0 over TCP, joins the collectives over its own interface, and receives its
layers' KV over gRPC (the controller picks gRPC because the instances' ranks span nodes). Greedy
tokens equal the single-process offline engine's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_e2e import PROMPTS

from engine.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def test_a_decode_instance_split_across_two_nodes_serves_the_offline_tokens(embedded_llm):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("multinode_serve.py"))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    decode_nodes = result["nodes"]["decode-0"]
    assert len(decode_nodes) == 2 and len(set(decode_nodes)) == 2  # one stage on each node
    assert result["kind"] == "grpc"  # the ranks span nodes: no shared memory between them
    expected = embedded_llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert result["tokens"] == [e.token_ids for e in expected]
