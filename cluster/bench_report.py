"""What `pdserve bench` writes: per rate, SLO attainment and latency percentiles (measured, and the
simulator's prediction beside them when asked); for the whole run, goodput, a JSON file with every
request, a markdown summary and PNG plots (attainment against rate; TTFT and TPOT CDFs)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.bench import Measurement
from placement.errors import PlacementError
from placement.simulator import SLO, RequestResult, attainment

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, interpolated linearly between order statistics (nan when empty)."""
    return float(np.percentile(values, q)) if values else math.nan


@dataclass
class RateResult:
    """One run at one rate."""

    rate: float
    measured: list[Measurement]
    wall_s: float  # from the first scheduled arrival to the last request's end
    predicted: list[RequestResult] | None = None  # the simulator on the same requests

    def summary(self, slo: SLO) -> dict[str, Any]:
        done = [m for m in self.measured if not m.rejected]
        row: dict[str, Any] = {
            "rate": self.rate,
            "requests": len(self.measured),
            "failed": len(self.measured) - len(done),
            "attainment": attainment(self.measured, slo),
            "ttft_attainment": sum(m.ttft <= slo.ttft for m in done) / max(1, len(self.measured)),
            "tpot_attainment": sum(m.tpot <= slo.tpot for m in done) / max(1, len(self.measured)),
            "output_tokens_per_s": sum(m.output_tokens for m in done) / self.wall_s if self.wall_s else 0.0,
            "max_client_lag_s": max((m.sent - m.arrival for m in self.measured), default=0.0),
        }
        for name in ("ttft", "tpot"):
            values = [getattr(m, name) for m in done]
            for q in PERCENTILES:
                row[f"{name}_p{q}_ms"] = percentile(values, q) * 1e3
        e2e = [m.last_token - m.arrival for m in done]
        row["e2e_p50_s"], row["e2e_p90_s"] = percentile(e2e, 50), percentile(e2e, 90)
        if self.predicted is not None:
            row["predicted_attainment"] = attainment(self.predicted, slo)
            row["predicted_ttft_p90_ms"] = percentile([r.ttft for r in self.predicted], 90) * 1e3
            row["predicted_tpot_p90_ms"] = percentile([r.tpot for r in self.predicted], 90) * 1e3
        errors = sorted({m.error for m in self.measured if m.error})
        if errors:
            row["errors"] = errors[:5]
        return row


@dataclass
class BenchReport:
    config: str
    target: str
    workload: str
    slo: SLO
    runs: list[RateResult] = field(default_factory=list)
    goodput: float | None = None  # measured, when a goodput search ran
    calibration: dict[str, float] | None = None  # the profile's scale factors and the rate they came from

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "target": self.target,
            "workload": self.workload,
            "slo": {
                "ttft_ms": self.slo.ttft * 1e3,
                "tpot_ms": self.slo.tpot * 1e3,
                "attainment": self.slo.attainment,
            },
            "goodput": self.goodput,
            "calibration": self.calibration,
            "runs": [
                {
                    "summary": run.summary(self.slo),
                    "requests": [_row(m) for m in run.measured],
                    "predicted": None if run.predicted is None else [_row(r) for r in run.predicted],
                }
                for run in self.runs
            ],
        }

    def markdown(self) -> str:
        slo = self.slo
        lines = [
            f"# pdserve bench: {self.workload}",
            "",
            f"Config `{self.config}`, endpoint `{self.target}`; SLO: TTFT <= {slo.ttft * 1e3:g} ms and "
            f"TPOT <= {slo.tpot * 1e3:g} ms for {slo.attainment:.0%} of requests.",
            "",
        ]
        predicted = any(run.predicted is not None for run in self.runs)
        header = "| rate (req/s) | requests | failed | attainment |"
        header += " predicted |" if predicted else ""
        header += " TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) | tokens/s |"
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for run in sorted(self.runs, key=lambda r: r.rate):
            s = run.summary(slo)
            row = f"| {s['rate']:.3g} | {s['requests']} | {s['failed']} | {s['attainment']:.1%} |"
            if predicted:
                p = s.get("predicted_attainment")
                row += " - |" if p is None else f" {p:.1%} |"
            row += (
                f" {s['ttft_p50_ms']:.0f} / {s['ttft_p90_ms']:.0f} | {s['tpot_p50_ms']:.0f} / "
                f"{s['tpot_p90_ms']:.0f} | {s['output_tokens_per_s']:.0f} |"
            )
            lines.append(row)
        if self.calibration is not None:
            c = self.calibration
            lines += [
                "",
                f"Predictions use the profile scaled to the serving path at {c['rate']:.3g} req/s: "
                f"prefill x{c['prefill']:.2f}, decode x{c['decode']:.2f}.",
            ]
        if self.goodput is not None:
            lines += ["", f"Goodput: {self.goodput:.3g} req/s at {slo.attainment:.0%} attainment."]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path, plots: bool = True) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "results.json", out / "summary.md"]
        written[0].write_text(json.dumps(_finite(self.to_dict()), indent=1))
        written[1].write_text(self.markdown())
        if plots:
            written += self.plot(out)
        return written

    def plot(self, out: Path) -> list[Path]:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise PlacementError(
                "plots need matplotlib: pip install 'pdserve[plot]' (or --no-plots)"
            ) from None
        runs = sorted(self.runs, key=lambda r: r.rate)
        paths = [out / "attainment.png", out / "latency_cdf.png"]
        fig, ax = plt.subplots(figsize=(6, 4))
        rates = [r.rate for r in runs]
        ax.plot(rates, [100 * attainment(r.measured, self.slo) for r in runs], marker="o", label="measured")
        if any(r.predicted is not None for r in runs):
            pairs = [
                (r.rate, 100 * attainment(r.predicted, self.slo)) for r in runs if r.predicted is not None
            ]
            ax.plot(*zip(*pairs, strict=True), marker="x", linestyle="--", label="simulated")
        ax.axhline(100 * self.slo.attainment, color="grey", linestyle=":", label="target")
        ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment (%)", title=self.workload, ylim=(0, 102))
        ax.legend()
        fig.tight_layout()
        fig.savefig(paths[0])
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, name, limit in ((axes[0], "ttft", self.slo.ttft), (axes[1], "tpot", self.slo.tpot)):
            for run in runs:
                values = sorted(1e3 * getattr(m, name) for m in run.measured if not m.rejected)
                if values:
                    ax.plot(
                        values,
                        [(i + 1) / len(values) for i in range(len(values))],
                        label=f"{run.rate:.3g} req/s",
                    )
            ax.axvline(1e3 * limit, color="grey", linestyle=":", label="SLO")
            ax.set(xlabel=f"{name.upper()} (ms)", ylabel="fraction of requests", xscale="log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(paths[1])
        plt.close(fig)
        return paths


def _row(r: RequestResult) -> dict[str, Any]:
    return {k: v for k, v in asdict(r).items() if not (isinstance(v, float) and math.isnan(v))}


def _finite(value: Any) -> Any:
    """JSON has no NaN: unknown numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
