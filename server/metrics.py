"""Prometheus metrics, one registry per app, bounded label sets only.

Labels are route templates, status codes, policy names, store operations and a bounded
set of stream groups: never a stream id.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # the *_created series only add noise to dashboards
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """All metrics of one server instance."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("ttaserve_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"], registry=r)  # fmt: skip
        self.request_latency = Histogram("ttaserve_http_request_duration_seconds", "HTTP request latency", ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_wait = Histogram("ttaserve_queue_wait_seconds", "Time a request waited for its batch", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.forward_seconds = Histogram("ttaserve_forward_duration_seconds", "Model forward pass time per batch", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_images = Histogram("ttaserve_batch_size_images", "Images per forward batch", buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.batch_requests = Histogram("ttaserve_batch_size_requests", "Requests per forward batch", buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.images = Counter("ttaserve_images_total", "Images predicted", ["policy"], registry=r)  # fmt: skip
        self.state_updates = Counter("ttaserve_state_updates_total", "Stream states written", ["policy"], registry=r)  # fmt: skip
        self.cas_conflicts = Counter("ttaserve_state_conflicts_total", "Compare-and-set conflicts (update re-applied)", registry=r)  # fmt: skip
        self.state_discarded = Counter("ttaserve_state_discarded_total", "Stored states unusable (schema/model mismatch) and started afresh", registry=r)  # fmt: skip
        self.nonfinite_updates = Counter("ttaserve_nonfinite_updates_total", "State updates dropped because they held NaN/inf", registry=r)  # fmt: skip
        self.resets = Counter("ttaserve_stream_resets_total", "Stream resets", ["reason"], registry=r)  # fmt: skip
        self.store_seconds = Histogram("ttaserve_state_store_duration_seconds", "State store operation latency", ["operation"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.store_errors = Counter("ttaserve_state_store_errors_total", "State store operations that failed", ["operation"], registry=r)  # fmt: skip
        self.active_streams = Gauge("ttaserve_active_streams", "Streams with a stored state", registry=r)  # fmt: skip
        self.queued_images = Gauge("ttaserve_queued_images", "Images waiting for a forward pass", registry=r)  # fmt: skip

    @contextlib.contextmanager
    def store_latency(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.store_seconds.labels(operation=operation).observe(time.perf_counter() - started)
