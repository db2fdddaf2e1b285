"""The server's Prometheus metrics, in a registry of its own (one per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class ServeMetrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("pocketdiff_requests", "image generation requests by HTTP status", ["status"],
                                registry=self.registry)
        self.queue_depth = Gauge("pocketdiff_queue_depth", "requests waiting for a batch", registry=self.registry)
        self.batch_images = Histogram("pocketdiff_batch_images", "images per UNet batch",
                                      buckets=tuple(range(1, max_batch + 1)), registry=self.registry)
        self.batch_seconds = Histogram("pocketdiff_batch_seconds", "seconds per batch (text, sampling, decode)",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("pocketdiff_request_seconds", "seconds from request to answer",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe_batch(self, jobs, seconds: float) -> None:
        self.batch_images.observe(sum(len(j.prompts) for j in jobs))
        self.batch_seconds.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
