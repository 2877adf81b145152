"""Prometheus metrics of one Ratchet: requests and latency by route and by model, retrieval time,
memory hits, corrections pending, cycles by verdict with their durations, the active version,
engine restarts. Counters are updated as things happen; the rest is read when scraped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY = (0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)  # seconds


class Metrics:
    def __init__(self, ratchet):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("ratchet_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("ratchet_http_request_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY, registry=self.registry)
        self.chats = Counter("ratchet_chats", "Chat answers by model asked for and what answered",
                             ["model", "adapter"], registry=self.registry)
        self.chat_latency = Histogram("ratchet_chat_seconds", "Engine time of a chat answer by model",
                                      ["model"], buckets=LATENCY, registry=self.registry)
        self.retrieval = Histogram("ratchet_retrieval_seconds", "Embedding the question and searching the memory",
                                   buckets=LATENCY, registry=self.registry)
        self.memory_hits = Counter("ratchet_memory_hits", "Memories put into prompts", registry=self.registry)
        self.registry.register(_State(ratchet))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_chat(self, model: str, reply) -> None:
        self.chats.labels(model, reply.adapter or "base").inc()
        self.chat_latency.labels(model).observe(reply.latency_ms / 1000)
        self.retrieval.observe(reply.retrieval_ms / 1000)
        self.memory_hits.inc(len(reply.memories))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _State:
    """What is read from the server when scraped: pending corrections, cycles, the active version, restarts."""

    def __init__(self, ratchet):
        self.r = ratchet

    def describe(self):
        return []

    def collect(self):
        r = self.r
        active = r.registry.active()
        yield GaugeMetricFamily("ratchet_active_version", "The adapter version served as `ratchet` (0: the base model)",
                                value=active.version if active else 0)
        yield GaugeMetricFamily("ratchet_engine_restarts", "Times the engine was restarted after dying",
                                value=r.restarts)
        if r.cycles is None:
            return
        yield GaugeMetricFamily("ratchet_corrections_pending", "Corrections admitted to the next cycle, not yet in the weights",
                                value=len(r.cycles.pending()))
        by_status = GaugeMetricFamily("ratchet_cycles", "Consolidation cycles by status", labels=["status"])
        seconds = GaugeMetricFamily("ratchet_cycle_seconds_total", "Time spent in finished cycles, by status",
                                    labels=["status"])
        counts: dict[str, int] = {}
        spent: dict[str, float] = {}
        for c in r.cycles.list():
            counts[c["status"]] = counts.get(c["status"], 0) + 1
            if c.get("metrics", {}).get("cycle_seconds") is not None:
                spent[c["status"]] = spent.get(c["status"], 0.0) + c["metrics"]["cycle_seconds"]
        for status, n in counts.items():
            by_status.add_metric([status], n)
        for status, s in spent.items():
            seconds.add_metric([status], s)
        yield by_status
        yield seconds
