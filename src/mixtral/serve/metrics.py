"""Prometheus metrics of one server, in a registry of its own (so that several apps in one process keep theirs)."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, running: Callable[[], float], waiting: Callable[[], float],
                 batch: Callable[[], float], offload: Callable[[], dict[str, Any] | None] = lambda: None,
                 prefix: Callable[[], Any] = lambda: None) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mixtral_requests", "HTTP requests to /v1 routes, by route and status code",
                                ["route", "status"], registry=r)
        self.finished = Counter("mixtral_sequences_finished", "Generated sequences, by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("mixtral_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("mixtral_generation_tokens", "Tokens generated", registry=r)
        Gauge("mixtral_requests_running", "Sequences decoding in the batch (rows in use)",
              registry=r).set_function(running)
        Gauge("mixtral_requests_waiting", "Sequences waiting for a row", registry=r).set_function(waiting)
        Gauge("mixtral_batch_size", "Rows in the latest decode step", registry=r).set_function(batch)
        self.ttft = Histogram("mixtral_time_to_first_token_seconds", "Request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("mixtral_time_per_output_token_seconds",
                              "Time between a sequence's tokens after the first", buckets=TOKEN_BUCKETS, registry=r)
        for key, help_text in (("hits", "Experts a step needed that were resident (offloaded experts)"),
                               ("misses", "Experts read from the offload folder"),
                               ("bytes_read", "Bytes of experts read from the offload folder"),
                               ("hit_rate", "hits / (hits + misses) of the offloaded experts"),
                               ("prefetched", "Experts read ahead on the next layer's router's guess"),
                               ("prefetch_accuracy", "Share of the experts read ahead that a step then used")):
            Gauge(f"mixtral_offload_{key}", help_text, registry=r).set_function(
                lambda key=key: (offload() or {}).get(key, 0))
        for key, help_text in (("hit_rate", "Share of the prompt tokens whose keys and values came from the prefix "
                                            "cache"),
                               ("hit_tokens", "Prompt tokens taken from the prefix cache"),
                               ("prompt_tokens", "Prompt tokens looked up in the prefix cache")):
            Gauge(f"mixtral_prefix_cache_{key}", help_text, registry=r).set_function(
                lambda key=key: getattr(prefix(), key, 0))
        self.e2e = Histogram("mixtral_e2e_request_latency_seconds", "Request arrival to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
