"""The headline experiment (issue 7): goodput of a disaggregated deployment against a colocated one
on the same resources, for each workload preset, measured on real clusters beside the placement
model's prediction.

    .venv/bin/pdserve profile --config configs/local-bench.yaml --out profile.json
    .venv/bin/python scripts/bench_goodput.py --profile profile.json --out goodput-results

For each workload (lengths times `--length-scale`, the one factor that fits them to the hardware):

1. SLOs, the way DistServe set theirs: from one request's own latency on this hardware (the
   profile's prefill of the mean prompt, and its decode step at batch 1 and the mean context),
   times a per-application factor (`APPLICATIONS`): chatbot moderate on both, code completion
   tight on TTFT, summarization loose on TTFT and tight on TPOT.
2. The placement model's prediction: each configuration's simulated goodput (the planner's own
   bisection on the profile), and the search's pick over the same cores (`pdserve plan`).
3. For each configuration: start `pdserve serve`, bisect its goodput with `pdserve bench`'s
   session (first guess: the prediction; every probe simulated too, on the very requests sent),
   stop it. Both configurations see the same requests at a given rate (same seed).

Writes `OUT/<workload>/<configuration>/` (each bench report with its CDFs), and `OUT/results.json`,
`OUT/summary.md`, `OUT/attainment.png` (attainment against rate, both configurations, per workload).
A finished `<workload>/<configuration>` is kept on a rerun, so an interrupted experiment resumes.

`--resimulate PROFILE` measures nothing: it simulates the recorded runs again, on the very
requests each one sent and under the SLOs the experiment set, with another profile of the same
machine (one taken with contention, say), and writes `OUT/resimulated.md` beside the original
predictions and the measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.bench import LoadSpec, Traffic  # noqa: E402
from cluster.bench_report import BenchReport  # noqa: E402
from cluster.bench_session import BenchSession  # noqa: E402
from cluster.config import ClusterConfig, SLOSection, load_config  # noqa: E402
from placement import plan as planning  # noqa: E402
from placement.planner import Planner  # noqa: E402
from placement.profiler import Profile  # noqa: E402
from placement.simulator import SLO, attainment  # noqa: E402
from placement.workload import RequestSpec  # noqa: E402

# (TTFT, TPOT) SLO as multiples of one request's own latency on this hardware, in the pattern of
# DistServe's choices (chatbot 0.25 s / 0.1 s, code 0.125 s / 0.2 s, summarization 15 s / 0.15 s):
# code completion waits on its first token and tolerates slower tokens after it, summarization
# accepts a long first wait. TPOT factors are smaller than DistServe's (~6-10x its GPUs' lone
# decode step) because a CPU pays for every sequence in a batch, where a GPU's step barely grows.
APPLICATIONS = {"chatbot": (5.0, 3.0), "code": (2.5, 5.0), "summarization": (8.0, 2.0)}
READY_LINE = "Ctrl-C drains and stops."


def lone_latencies(profile: Profile, traffic: Traffic) -> dict[str, float]:
    """One request's prefill of the mean prompt and its decode step alone at the mean context."""
    requests = traffic.at(1.0)
    mean_in = statistics.mean(r.input_len for r in requests)
    mean_out = statistics.mean(r.output_len for r in requests)
    return {
        "mean_input": mean_in,
        "mean_output": mean_out,
        "prefill_s": profile.prefill_time([(round(mean_in), 0)]),
        "decode_step_s": profile.decode_time(1, round(mean_in + mean_out / 2)),
    }


def for_workload(
    config: ClusterConfig, workload: str, slo: SLOSection, scale: float, profile: str
) -> ClusterConfig:
    placement = dataclasses.replace(
        config.placement, workload=workload, trace=None, length_scale=scale, profile=profile
    )
    return dataclasses.replace(config, slo=slo, placement=placement)


def predicted_goodput(config: ClusterConfig) -> float:
    """The planner's simulated goodput of the config's own pools."""
    planner = Planner(planning.search_space(config))
    return planner.goodput(planner.whole(planning.configured(config)))


def planner_pick(config: ClusterConfig, cores: int) -> dict[str, Any]:
    """What `pdserve plan` picks for this workload over `cores` CPU cores on one node."""
    placement = dataclasses.replace(
        config.placement, mode="auto", nodes=1, gpus_per_node=cores, max_gpus=cores, rate=None
    )
    result = planning.plan(dataclasses.replace(config, placement=placement))
    best = result.candidates[0]
    return {
        "kind": "colocated" if best.colocated is not None else "disaggregated",
        "description": best.describe(),
        "goodput_per_core": best.goodput_per_gpu,
        "table": planning.table(result),
    }


class Server:
    """`pdserve serve --config PATH` in a child process on a free gRPC port, ready when it says so;
    stopped with Ctrl-C (SIGINT) the way a user stops it."""

    def __init__(self, config_path: str, log_path: Path, ready_timeout: float = 600.0) -> None:
        self.config_path, self.log_path, self.ready_timeout = config_path, log_path, ready_timeout
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        command = [sys.executable, "-m", "cluster.cli", "serve", "--config", self.config_path]
        command += ["--grpc-port", str(self.port), "--http-port", "0"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + self.ready_timeout
        while READY_LINE not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._stop()
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"pdserve serve --config {self.config_path} did not start:\n{tail}")
            time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(
    name: str,
    config_path: str,
    config: ClusterConfig,
    traffic: Traffic,
    profile: Profile,
    first_guess: float,
    args: argparse.Namespace,
    out: Path,
) -> dict[str, Any]:
    """Serve `config_path`, bisect its goodput, write its bench report under `out`."""
    done = out / "results.json"
    if done.is_file():
        print(f"goodput: {out} is done already; kept", file=sys.stderr)
        return json.loads(done.read_text())
    slo = SLO(config.slo.ttft_ms / 1e3, config.slo.tpot_ms / 1e3, config.slo.attainment)
    with Server(config_path, out / "serve.log") as server:
        target = f"127.0.0.1:{server.port}"
        spec = LoadSpec(
            target, config.server.auth_token, seed=args.seed, timeout=config.server.request_timeout_s
        )
        report = BenchReport(config_path, target, f"{traffic.describe()} ({name})", slo)
        log = lambda line: print(f"[{name}] {line}", file=sys.stderr)  # noqa: E731
        session = BenchSession(traffic, spec, report, planning.predictor(config), profile, log=log)
        session.goodput(max(first_guess, args.min_rate), args.steps, growth=args.growth)
    report.write(out, plots=not args.no_plots)
    return report.to_dict()


def curve(result: dict[str, Any], key: str) -> list[tuple[float, float]]:
    return sorted((r["summary"]["rate"], r["summary"][key]) for r in result["runs"])


def write_summary(out: Path, results: dict[str, Any]) -> None:
    lines = [
        "# Disaggregated against colocated: goodput per workload",
        "",
        f"{results['machine']}; {results['date']}; lengths x{results['length_scale']:g}; "
        f"up to {results['num_requests']} requests per probe; attainment target "
        f"{results['attainment']:.0%}.",
        "",
        "| workload | SLO TTFT / TPOT (ms) | one request alone: prefill / decode step (ms) | "
        "disaggregated goodput (req/s) | colocated | ratio | predicted disaggregated / colocated | "
        "predicted winner | measured winner | planner's pick |",
        "|---|---|---|---:|---:|---:|---|---|---|---|",
    ]
    for workload, w in results["workloads"].items():
        c = w["configs"]
        if not all(name in c for name in ("disaggregated", "colocated")):
            continue
        d, k = c["disaggregated"], c["colocated"]
        ratio = d["goodput"] / k["goodput"] if k["goodput"] else float("inf")
        lines.append(
            f"| {workload} | {w['slo']['ttft_ms']:.0f} / {w['slo']['tpot_ms']:.0f} | "
            f"{w['lone']['prefill_s'] * 1e3:.0f} / {w['lone']['decode_step_s'] * 1e3:.0f} | "
            f"{d['goodput']:.3g} | {k['goodput']:.3g} | {ratio:.2f}x | "
            f"{d['predicted_goodput']:.3g} / {k['predicted_goodput']:.3g} | {w['predicted_winner']} | "
            f"{w['measured_winner']} | {w['planner']['kind']} ({w['planner']['description']}) |"
        )
    for workload, w in results["workloads"].items():
        lines += ["", f"## {workload}", ""]
        lines.append(
            "| configuration | rate (req/s) | attainment | simulated | TTFT p90 (ms) | TPOT p90 (ms) |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|")
        for name, c in w["configs"].items():
            for run in sorted(c["runs"], key=lambda r: r["rate"]):
                lines.append(
                    f"| {name} | {run['rate']:.3g} | {run['attainment']:.0%} | "
                    f"{run.get('predicted_attainment', float('nan')):.0%} | {run['ttft_p90_ms']:.0f} | "
                    f"{run['tpot_p90_ms']:.0f} |"
                )
        lines += ["", "The planner's ranking over the same cores:", "", w["planner"]["table"]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, results: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = results["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, (workload, w) in zip(axes[0], workloads.items(), strict=True):
        for (name, c), color in zip(w["configs"].items(), ("tab:blue", "tab:orange"), strict=False):
            rates = sorted(c["runs"], key=lambda r: r["rate"])
            xs = [r["rate"] for r in rates]
            ax.plot(xs, [100 * r["attainment"] for r in rates], marker="o", color=color, label=name)
            ax.plot(
                xs,
                [100 * r.get("predicted_attainment", float("nan")) for r in rates],
                marker="x",
                linestyle="--",
                color=color,
                label=f"{name} (simulated)",
            )
        ax.axhline(100 * results["attainment"], color="grey", linestyle=":", label="target")
        slo = w["slo"]
        ax.set(
            title=f"{workload} x{results['length_scale']:g} (TTFT {slo['ttft_ms']:.0f} ms, "
            f"TPOT {slo['tpot_ms']:.0f} ms)",
            xlabel="request rate (req/s)",
            ylabel="SLO attainment (%)",
            ylim=(0, 102),
        )
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "attainment.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def resimulate(out: Path, profile_path: str, paths: dict[str, str], cores: int) -> Path:
    """The recorded runs simulated again with `profile_path` (see the module doc)."""
    results = json.loads((out / "results.json").read_text())
    profile = Profile.load(profile_path)
    lines = [
        f"# The recorded runs simulated again with `{profile_path}`",
        "",
        f"Contention factors: {json.dumps(profile.contention) if profile.contention else 'none'}; "
        f"the runs: `{results['profile']}` ({results['date']}).",
        "",
        "| workload | configuration | rate (req/s) | measured | simulated then | simulated now |",
        "|---|---|---:|---:|---:|---:|",
    ]
    winners = []
    for workload, w in results["workloads"].items():
        slo_section = SLOSection(**w["slo"])
        slo = SLO(slo_section.ttft_ms / 1e3, slo_section.tpot_ms / 1e3, slo_section.attainment)
        predicted = {}
        for name in w["configs"]:
            config = for_workload(
                load_config(paths[name]), workload, slo_section, results["length_scale"], profile_path
            )
            predict = planning.predictor(config)
            report = json.loads((out / workload / name / "results.json").read_text())
            for run in sorted(report["runs"], key=lambda r: r["summary"]["rate"]):
                sent = [RequestSpec(r["arrival"], r["input_len"], r["output_len"]) for r in run["predicted"]]
                now = attainment(predict(sent, profile), slo)
                s = run["summary"]
                lines.append(
                    f"| {workload} | {name} | {s['rate']:.3g} | {s['attainment']:.0%} | "
                    f"{s['predicted_attainment']:.0%} | {now:.0%} |"
                )
            predicted[name] = predicted_goodput(config)
        pick = planner_pick(
            for_workload(
                load_config(paths["disaggregated"]),
                workload,
                slo_section,
                results["length_scale"],
                profile_path,
            ),
            cores,
        )
        measured = {n: c["goodput"] for n, c in w["configs"].items()}
        winners.append(
            f"| {workload} | {' / '.join(f'{predicted[n]:.3g}' for n in measured)} | "
            f"{max(predicted, key=predicted.get)} | {max(measured, key=measured.get)} | "
            f"{pick['description']} |"
        )
    lines += [
        "",
        "| workload | predicted goodput now ("
        + " / ".join(next(iter(results["workloads"].values()))["configs"])
        + ") | predicted winner now | measured winner | planner's pick now |",
        "|---|---|---|---|---|",
        *winners,
    ]
    path = out / "resimulated.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--disaggregated", default="configs/local-bench.yaml")
    parser.add_argument("--colocated", default="configs/local-colocated.yaml")
    parser.add_argument("--profile", required=True, help="a `pdserve profile` of this machine")
    parser.add_argument("--workloads", default="chatbot,code,summarization")
    parser.add_argument("--length-scale", type=float, default=0.5, help="every length times this")
    parser.add_argument("--num-requests", type=int, default=100, help="requests per probe at most")
    parser.add_argument("--duration", type=float, default=240.0, help="seconds of arrivals per probe at most")
    parser.add_argument("--steps", type=int, default=2, help="bisection steps after the bracket")
    parser.add_argument("--growth", type=float, default=1.5, help="bracket growth from the first guess")
    parser.add_argument("--min-rate", type=float, default=0.05, help="the lowest first guess (req/s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="goodput-results")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--resimulate", metavar="PROFILE", help="simulate the recorded runs with PROFILE")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = Profile.load(args.profile)
    paths = {"disaggregated": args.disaggregated, "colocated": args.colocated}
    bases = {name: load_config(path) for name, path in paths.items()}
    if bases["colocated"].is_colocated is False or bases["disaggregated"].is_colocated:
        raise SystemExit("--disaggregated must name a two-pool config and --colocated a colocated one")
    model = planning.model_config(bases["disaggregated"])
    max_len = min(bases["disaggregated"].model.max_model_len or model.max_model_len, model.max_model_len)
    cores = round(bases["disaggregated"].prefill.cpus + bases["disaggregated"].decode.cpus)
    attainment_target = bases["disaggregated"].slo.attainment
    if args.resimulate:
        print(resimulate(out, args.resimulate, paths, cores).read_text())
        return
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "profile": args.profile,
        "length_scale": args.length_scale,
        "num_requests": args.num_requests,
        "attainment": attainment_target,
        "applications": APPLICATIONS,
        "workloads": {},
    }
    for workload in args.workloads.split(","):
        traffic = Traffic(workload, args.num_requests, args.duration, args.length_scale, args.seed, max_len)
        lone = lone_latencies(profile, traffic)
        f_ttft, f_tpot = APPLICATIONS[workload]
        slo = SLOSection(
            round(f_ttft * lone["prefill_s"] * 1e3),
            round(f_tpot * lone["decode_step_s"] * 1e3),
            attainment_target,
        )
        configs = {
            name: for_workload(base, workload, slo, args.length_scale, args.profile)
            for name, base in bases.items()
        }
        w: dict[str, Any] = {"slo": dataclasses.asdict(slo), "lone": lone, "configs": {}}
        w["planner"] = planner_pick(configs["disaggregated"], cores)
        predicted = {name: predicted_goodput(config) for name, config in configs.items()}
        print(
            f"goodput: {workload}: SLO TTFT {slo.ttft_ms:g} ms, TPOT {slo.tpot_ms:g} ms; predicted "
            + ", ".join(f"{n} {g:.3g} req/s" for n, g in predicted.items())
            + f"; the planner picks {w['planner']['description']}",
            file=sys.stderr,
        )
        for name, config in configs.items():
            report = measure(
                name, paths[name], config, traffic, profile, predicted[name], args, out / workload / name
            )
            w["configs"][name] = {
                "goodput": report["goodput"],
                "predicted_goodput": predicted[name],
                "runs": [r["summary"] for r in report["runs"]],
            }
        measured = {n: c["goodput"] for n, c in w["configs"].items()}
        w["measured_winner"] = max(measured, key=measured.get)
        w["predicted_winner"] = max(predicted, key=predicted.get)
        results["workloads"][workload] = w
        (out / "results.json").write_text(json.dumps(results, indent=1))
        write_summary(out, results)
        if not args.no_plots:
            plot(out, results)
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
