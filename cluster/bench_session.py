"""`pdserve bench`'s runs: one rate after another (or a bisection for the goodput) against a
running cluster, each optionally simulated on the very requests that were sent."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from cluster.bench import LoadSpec, Measurement, Traffic, run_load
from cluster.bench_report import BenchReport, RateResult
from placement.errors import PlacementError
from placement.goodput import bisect_goodput
from placement.plan import Predictor
from placement.profiler import Profile
from placement.simulator import RequestResult, attainment


class BenchSession:
    """Runs one rate after another against the cluster and keeps them in `report`. With a
    `predictor` (the placement model on the config's pools), each run is also simulated on the
    very requests that were sent; with `calibrate`, the first run scales `profile` to the serving
    path (see `calibrate`) and every prediction uses the scaled profile."""

    def __init__(
        self,
        traffic: Traffic,
        spec: LoadSpec,
        report: BenchReport,
        predictor: Predictor | None = None,
        profile: Profile | None = None,
        calibrate: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        if calibrate and (predictor is None or profile is None):
            raise PlacementError("--calibrate needs --predict and a profile (--profile or placement.profile)")
        self.traffic, self.spec, self.report = traffic, spec, report
        self.predictor, self.profile, self.calibrate = predictor, profile, calibrate
        self.log = log

    def run(self, rate: float) -> RateResult:
        requests = self.traffic.at(rate)
        self.log(f"bench: {len(requests)} requests at {rate:.3g} req/s ({self.traffic.describe()})")
        start = time.perf_counter()
        measured = run_load(requests, self.spec)
        result = RateResult(rate, measured, time.perf_counter() - start)
        if self.predictor is not None:
            result.predicted = self.predictor(requests, self.profile)
            if self.calibrate and self.report.calibration is None:  # the first run calibrates the rest
                f_prefill, f_decode = calibrate(self.profile, measured, result.predicted)
                self.report.calibration = {"rate": rate, "prefill": f_prefill, "decode": f_decode}
                self.log(
                    f"bench: calibrated at {rate:.3g} req/s: prefill x{f_prefill:.2f}, decode x{f_decode:.2f}"
                )
                self.profile = self.profile.scaled(f_prefill, f_decode)
                result.predicted = self.predictor(requests, self.profile)
        self.report.runs.append(result)
        s = result.summary(self.report.slo)
        predicted = f", simulated {s['predicted_attainment']:.1%}" if result.predicted is not None else ""
        self.log(
            f"bench: {rate:.3g} req/s: attainment {s['attainment']:.1%}{predicted}; TTFT p90 "
            f"{s['ttft_p90_ms']:.0f} ms, TPOT p90 {s['tpot_p90_ms']:.0f} ms, {s['failed']} failed"
        )
        return result

    def rates(self, rates: list[float]) -> None:
        for rate in sorted(rates):
            self.run(rate)

    def goodput(self, first_guess: float, steps: int, growth: float = 2.0) -> float:
        """Bisect over rate for the highest one meeting the attainment target (each probe a run)."""
        slo = self.report.slo
        self.report.goodput = bisect_goodput(
            lambda rate: attainment(self.run(rate).measured, slo) >= slo.attainment,
            first_guess,
            steps,
            growth=growth,
        )
        return self.report.goodput


def calibrate(
    profile: Profile, measured: list[Measurement], predicted: list[RequestResult]
) -> tuple[float, float]:
    """(prefill, decode) factors that scale `profile` to the serving path, from a lightly loaded
    run: the median ratio of each request's prefill time on its instance (the server's timing) to
    the profile's, and of its measured TPOT to the TPOT simulated with the profile."""
    done = [(m, p) for m, p in zip(measured, predicted, strict=True) if not m.rejected]
    prefill = [m.server["prefill"] / profile.prefill_time([(m.input_len, 0)]) for m, _ in done if m.server]
    decode = [m.tpot / p.tpot for m, p in done if m.output_len > 1 and p.tpot > 0]
    if not prefill or not decode:
        raise PlacementError("calibration needs completed requests with more than one output token")
    return statistics.median(prefill), statistics.median(decode)
