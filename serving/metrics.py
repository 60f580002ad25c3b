"""Prometheus metrics of the service (BentoML serves them on /metrics).

Created when the service starts, not at import: BentoML sets PROMETHEUS_MULTIPROC_DIR in each
worker after importing the service module, and prometheus_client reads it when a metric is made.
"""
from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from models.decoding import Generation

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.requests = Counter("smelt_requests", "API requests by route and status code", ["route", "code"], registry=registry)
        self.tokens = Counter("smelt_generated_tokens", "New tokens generated", registry=registry)
        self.latency = Histogram("smelt_request_seconds", "Queue + generation time per request", buckets=LATENCY_BUCKETS,
                                 registry=registry)
        self.ttft = Histogram("smelt_time_to_first_token_seconds", "Time to the first new token (streamed and single requests)",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.decode_rate = Histogram("smelt_decode_tokens_per_second", "New tokens per second of generation, per request",
                                     buckets=RATE_BUCKETS, registry=registry)
        self.batch = Histogram("smelt_batch_size", "Size of the batch each request was decoded in", buckets=(1, 2, 4, 8, 16, 32), registry=registry)
        self.acceptance = Histogram("smelt_draft_acceptance_ratio", "Share of the target's tokens the draft proposed itself",
                                    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0), registry=registry)

    def observe(self, gen: Generation, seconds: float, batch_size: int, acceptance: float | None) -> None:
        self.tokens.inc(gen.new_tokens)
        self.latency.observe(seconds)
        self.batch.observe(batch_size)
        if gen.seconds > 0 and gen.new_tokens:
            self.decode_rate.observe(gen.new_tokens / gen.seconds)
        if gen.first_token_s is not None:
            self.ttft.observe(gen.first_token_s)
        if acceptance is not None:
            self.acceptance.observe(acceptance)

    def count(self, route: str, code: int) -> None:
        self.requests.labels(route=route, code=str(code)).inc()
