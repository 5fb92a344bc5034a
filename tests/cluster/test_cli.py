"""The `pdserve` command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from cluster.cli import build_parser


def test_generate_chat_one_shot():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "generate",
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "The capital of France is Paris."
    assert "tok/s" in proc.stderr


def test_interactive_chat_reads_turns_until_eof():
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "-i", "--device", "cpu", "--max-tokens", "12"],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_bad_model_is_a_clear_error_not_a_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "generate",
            "--model",
            str(tmp_path / "missing"),
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "pdserve: error: model" in proc.stderr and "Traceback" not in proc.stderr


def test_text_generation_without_a_tokenizer_says_so():
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--model", "dummy:smollm2-135m", "--chat"]
        + ["--device", "cpu", "--kv-cache-memory", str(4 << 20), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "has no tokenizer" in proc.stderr and "Traceback" not in proc.stderr


def test_parser_defaults():
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert args.model == "smollm2-135m" and args.temperature == 0.0 and args.max_tokens == 128


def test_serve_starts_the_local_cluster_answers_and_stops_on_sigterm():
    """What ./scripts/serve.sh runs: healthy, endpoints printed, a chat answered, SIGTERM stops it."""
    import json
    import re
    import signal
    import urllib.request
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve",
            "--config",
            str(config),
            "--grpc-port",
            "0",
            "--http-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C drains and stops" in line:
                break
        printed = "".join(lines)
        http = re.search(r"OpenAI HTTP\s+(http://\S+)/v1", printed).group(1)
        assert (
            re.search(r"gRPC\s+127\.0\.0\.1:\d+", printed) and "curl -s" in printed and "grpcurl" in printed
        )
        assert urllib.request.urlopen(http + "/health", timeout=30).status == 200
        body = {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32,
            "temperature": 0,
        }
        request = urllib.request.Request(
            http + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        reply = json.load(urllib.request.urlopen(request, timeout=120))
        assert reply["choices"][0]["message"]["content"] == "The capital of France is Paris."
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert "draining and stopping" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
