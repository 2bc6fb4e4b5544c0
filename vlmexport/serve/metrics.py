"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 (re-exported for the app)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("vlmexport_requests", "Chat-completion requests by outcome "
                                "(ok, cancelled, timeout, rejected, client_error, server_error)",
                                ["outcome"], registry=r)
        self.prompt_tokens = Counter("vlmexport_prompt_tokens", "Prompt positions processed (image tokens "
                                     "included)", registry=r)
        self.completion_tokens = Counter("vlmexport_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("vlmexport_time_to_first_token_seconds", "From admission to the first generated "
                              "token (queue wait, image encode and prefill included)", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.token_latency = Histogram("vlmexport_time_per_output_token_seconds", "Between consecutive generated "
                                       "tokens", buckets=_TOKEN_BUCKETS, registry=r)
        self.duration = Histogram("vlmexport_request_duration_seconds", "Whole request, admission to last token",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("vlmexport_queue_depth", "Requests admitted and waiting for a slot", registry=r)
        self.running = Gauge("vlmexport_running_requests", "Requests generating now", registry=r)
        self.slots = Gauge("vlmexport_slots", "Generations that can run at once (--max-concurrency)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
