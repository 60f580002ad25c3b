"""Prometheus metrics of the service (BentoML serves them on /metrics).

Created when the service starts, not at import: BentoML sets PROMETHEUS_MULTIPROC_DIR in each
worker after importing the service module, and prometheus_client reads it when a metric is made.
The engine (models/engine.py) reports to it from its thread: each step's batch and queue, each
request's first token and inter-token gaps, its end, and refused or cancelled requests.
"""
from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from models.decoding import Generation

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.requests = Counter("smelt_requests", "API requests by route and status code", ["route", "code"], registry=registry)
        self.events = Counter("smelt_engine_requests", "Requests the engine refused (queue full: 429) or dropped "
                              "(client gone)", ["event"], registry=registry)
        self.tokens = Counter("smelt_generated_tokens", "New tokens generated", registry=registry)
        self.latency = Histogram("smelt_request_seconds", "Queue + generation time per request", buckets=LATENCY_BUCKETS,
                                 registry=registry)
        self.ttft = Histogram("smelt_time_to_first_token_seconds", "From arrival to the first new token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("smelt_inter_token_seconds", "Gap between a request's successive new tokens",
                             buckets=GAP_BUCKETS, registry=registry)
        self.decode_rate = Histogram("smelt_decode_tokens_per_second", "New tokens per second of generation, per request",
                                     buckets=RATE_BUCKETS, registry=registry)
        self.batch = Histogram("smelt_batch_size", "Requests in the running batch at each decode step", buckets=BATCH_BUCKETS,
                               registry=registry)
        self.running = Gauge("smelt_running_requests", "Requests in the running batch", registry=registry,
                             multiprocess_mode="livesum")
        self.queue = Gauge("smelt_queue_depth", "Requests waiting for a row of the batch", registry=registry,
                           multiprocess_mode="livesum")
        self.proposed = Counter("smelt_draft_proposed_tokens", "Tokens proposed by the draft (or prompt lookup)",
                                registry=registry)
        self.accepted = Counter("smelt_draft_accepted_tokens", "Proposed tokens the target kept", registry=registry)
        self.acceptance = Histogram("smelt_draft_acceptance_ratio", "Share of proposed tokens the target kept, per request",
                                    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0), registry=registry)

    def observe_step(self, running: int, queued: int) -> None:
        self.batch.observe(running)
        self.running.set(running)
        self.queue.set(queued)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float, tokens: int) -> None:
        for _ in range(tokens):  # a verify accepts several tokens at once: each is one gap of the average
            self.itl.observe(seconds)

    def observe(self, gen: Generation, seconds: float, acceptance: float | None) -> None:
        self.tokens.inc(gen.new_tokens)
        self.latency.observe(seconds)
        decoding = gen.seconds - (gen.first_token_s or 0.0)
        if decoding > 0 and gen.new_tokens > 1:
            self.decode_rate.observe((gen.new_tokens - 1) / decoding)
        if gen.proposed:
            self.proposed.inc(gen.proposed)
            self.accepted.inc(gen.accepted)
        if acceptance is not None:
            self.acceptance.observe(acceptance)

    def count_event(self, event: str) -> None:
        self.events.labels(event=event).inc()

    def count(self, route: str, code: int) -> None:
        self.requests.labels(route=route, code=str(code)).inc()
