"""Prometheus metrics for one server: a private registry, exposed as text at `GET /metrics`.

Each app owns its `CollectorRegistry` (several apps in one process, as in tests, never clash).
Request gauges are read from the live engines at scrape time, so they cannot drift; histograms
and counters are updated by the request handlers. Series carry the `model` and `version` labels
of the model version that served them, so a hot reload shows as a new series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


Snapshot = Callable[[], list[tuple[str, str, int, int, bool, dict[str, int]]]]

# The engine's prefill counters (`Engine.prefill_counts`), exported as counters.
_PREFILL_COUNTERS = {
    "prefilled": ("lmloop_prompt_tokens_prefilled", "prompt tokens run through the model"),
    "prefix_hits": ("lmloop_prefix_cache_hits", "requests that reused a cached prompt prefix"),
    "prefix_tokens_reused": (
        "lmloop_prefix_cache_tokens_reused",
        "prompt tokens whose keys/values came from the prefix cache instead of a prefill",
    ),
}


# The engine's resident bytes (`Engine.resident_bytes`), passed as "resident_<component>".
RESIDENT = "resident_"


class _EngineCollector(Collector):
    """`lmloop_requests_running` / `_waiting`, `lmloop_model_info`, the prefill counters and
    `lmloop_resident_bytes` per component (weights, KV cache, prefix cache), read when
    scraped."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot  # -> [(model, version, running, waiting, current, counts)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "version"]
        running = GaugeMetricFamily(
            "lmloop_requests_running", "requests in the engine's running batch", labels=labels
        )
        waiting = GaugeMetricFamily(
            "lmloop_requests_waiting", "requests queued for a batch slot", labels=labels
        )
        info = GaugeMetricFamily(
            "lmloop_model_info", "1 for the model version taking new requests", labels=labels
        )
        counters = {
            key: CounterMetricFamily(name, doc, labels=labels)
            for key, (name, doc) in _PREFILL_COUNTERS.items()
        }
        resident = GaugeMetricFamily(
            "lmloop_resident_bytes",
            "bytes the model version's engine holds, by component: weights (and tables), "
            "kv_cache, prefix_cache",
            labels=[*labels, "component"],
        )
        for model, version, n_run, n_wait, current, counts in self.snapshot():
            for key, value in counts.items():
                if key.startswith(RESIDENT):
                    resident.add_metric([model, version, key[len(RESIDENT) :]], value)
            running.add_metric([model, version], n_run)
            waiting.add_metric([model, version], n_wait)
            info.add_metric([model, version], 1 if current else 0)
            for key, family in counters.items():
                if key in counts:
                    family.add_metric([model, version], counts[key])
        yield running
        yield waiting
        yield info
        yield from counters.values()
        yield resident


class ServerMetrics:
    def __init__(self, snapshot: Snapshot):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model", "version"]
        self.ttft = Histogram(
            "lmloop_time_to_first_token_seconds",
            "time from request arrival to the first generated token",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "lmloop_time_per_output_token_seconds",
            "mean time between output tokens after the first, per request",
            labels,
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "lmloop_prompt_tokens", "prompt tokens processed", labels, registry=self.registry
        )
        self.completion_tokens = Counter(
            "lmloop_completion_tokens", "tokens generated", labels, registry=self.registry
        )
        self.requests = Counter(
            "lmloop_http_requests",
            "API requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(snapshot))

    def observe_request(
        self,
        model: str,
        version: str,
        *,
        prompt_tokens: int,
        completion_tokens: list[int],
        ttft: float | None,
        total: float,
    ) -> None:
        """`completion_tokens`: one count per choice. The choices decode side by side in the
        batch, so time per output token follows the longest one, not their sum."""
        self.prompt_tokens.labels(model, version).inc(prompt_tokens)
        self.completion_tokens.labels(model, version).inc(sum(completion_tokens))
        longest = max(completion_tokens, default=0)
        if ttft is not None:
            self.ttft.labels(model, version).observe(ttft)
            if longest > 1:
                self.tpot.labels(model, version).observe(max(0.0, total - ttft) / (longest - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
