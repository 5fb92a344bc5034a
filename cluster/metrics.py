"""The cluster's Prometheus metrics: latency histograms per request phase, request and token
counters, queue gauges and KV blocks per instance, in one registry served at `/metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cluster.protocol import Final

CONTENT_TYPE = CONTENT_TYPE_LATEST
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "pdserve_time_to_first_token_seconds", "Arrival to first token.", buckets=_SLOW, registry=r
        )
        self.tpot = Histogram(
            "pdserve_time_per_output_token_seconds",
            "Mean time per output token after the first.",
            buckets=_FAST,
            registry=r,
        )
        self.queue = Histogram(
            "pdserve_queue_time_seconds", "Arrival to prefill start.", buckets=_SLOW, registry=r
        )
        self.transfer = Histogram(
            "pdserve_kv_transfer_seconds",
            "Moving a request's KV from prefill to decode.",
            buckets=_FAST,
            registry=r,
        )
        self.e2e = Histogram(
            "pdserve_e2e_request_latency_seconds", "Arrival to the final message.", buckets=_SLOW, registry=r
        )
        self.requests = Counter(
            "pdserve_requests", "Finished requests by finish reason.", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter(
            "pdserve_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens = Counter("pdserve_generation_tokens", "Tokens generated.", registry=r)
        self.rejected = Counter(
            "pdserve_rejected_requests", "Requests refused, by status code.", ["code"], registry=r
        )
        self.retries = Counter(
            "pdserve_retries", "Requests moved to another instance after a failure.", registry=r
        )
        self.running = Gauge("pdserve_requests_running", "Requests past prefill, decoding.", registry=r)
        self.waiting = Gauge(
            "pdserve_requests_waiting", "Requests admitted and not yet decoding.", registry=r
        )
        self.kv_blocks_used = Gauge(
            "pdserve_kv_blocks_used", "KV cache blocks in use.", ["instance", "role"], registry=r
        )
        self.kv_blocks_total = Gauge(
            "pdserve_kv_blocks_total", "KV cache blocks.", ["instance", "role"], registry=r
        )

    def observe(self, final: Final) -> None:
        t = final.timings
        self.requests.labels(final.finish_reason).inc()
        self.prompt_tokens.inc(final.prompt_tokens)
        self.generation_tokens.inc(final.completion_tokens)
        self.e2e.observe(t.e2e)
        if final.completion_tokens:
            self.ttft.observe(t.ttft)
            self.queue.observe(t.queued)
        if final.completion_tokens > 1:
            self.tpot.observe(t.tpot)
            self.transfer.observe(t.transfer)

    def report_blocks(self, instance: str, role: str, used: int, total: int) -> None:
        self.kv_blocks_used.labels(instance, role).set(used)
        self.kv_blocks_total.labels(instance, role).set(total)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
