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
        self.state_updates_dropped = Counter("ttaserve_state_updates_dropped_total", "State updates given up after too many compare-and-set conflicts", registry=r)  # fmt: skip
        self.state_discarded = Counter("ttaserve_state_discarded_total", "Stored states unusable (schema/model mismatch) and started afresh", registry=r)  # fmt: skip
        self.compilations = Counter("ttaserve_forward_compilations_total", "Graphs compiled while serving by a compiled forward that was not warmed up (each stalls the forward thread; TTASERVE_COMPILE_POLICIES)", registry=r)  # fmt: skip
        self.eager_fallbacks = Counter("ttaserve_forward_eager_fallbacks_total", "Forward passes of a compiled policy that ran eager: the warm-up did not compile their batch variant (slower, no stall; TTASERVE_COMPILE_POLICIES)", registry=r)  # fmt: skip
        self.nonfinite_updates = Counter("ttaserve_nonfinite_updates_total", "State updates dropped because they held NaN/inf", registry=r)  # fmt: skip
        self.resets = Counter("ttaserve_stream_resets_total", "Stream resets", ["reason"], registry=r)  # fmt: skip
        self.store_seconds = Histogram("ttaserve_state_store_duration_seconds", "State store operation latency", ["operation"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.store_errors = Counter("ttaserve_state_store_errors_total", "State store operations that failed", ["operation"], registry=r)  # fmt: skip
        self.active_streams = Gauge("ttaserve_active_streams", "Streams with a stored state", registry=r)  # fmt: skip
        self.degraded = Counter("ttaserve_degraded_responses_total", "Requests answered without the shared state store", registry=r)  # fmt: skip
        # drift and adaptation per stream group (X-Stream-Group, bounded; overflow -> "other")
        self.group_images = Counter("ttaserve_group_images_total", "Images predicted per stream group", ["group"], registry=r)  # fmt: skip
        self.group_filtered = Counter("ttaserve_group_samples_filtered_total", "Samples the reliability gate kept from updating state", ["group"], registry=r)  # fmt: skip
        self.group_open_set = Counter("ttaserve_group_samples_open_set_total", "Samples flagged as open-set (unknown class)", ["group"], registry=r)  # fmt: skip
        self.group_bn_distance = Gauge("ttaserve_group_bn_statistics_distance", "Mean standardized distance of the group's adapted BN statistics from the source statistics", ["group"], registry=r)  # fmt: skip
        self.group_entropy = Gauge("ttaserve_group_prediction_entropy_nats", "EMA of mean prediction entropy of the group's samples", ["group"], registry=r)  # fmt: skip
        self.group_label_shift = Gauge("ttaserve_group_label_shift_tv", "Total variation between the group's estimated label prior and the source prior", ["group"], registry=r)  # fmt: skip
        self.group_accuracy = Gauge("ttaserve_group_estimated_accuracy_ratio", "Label-free accuracy estimate (ATC calibrated on source data)", ["group"], registry=r)  # fmt: skip
        self.source_entropy = Gauge("ttaserve_source_prediction_entropy_nats", "Mean prediction entropy on held-out source data (calibration baseline)", registry=r)  # fmt: skip
        self.source_accuracy = Gauge("ttaserve_source_accuracy_ratio", "Accuracy on held-out source data (calibration)", registry=r)  # fmt: skip
        self.queued_images = Gauge("ttaserve_queued_images", "Images waiting for a forward pass", registry=r)  # fmt: skip

    @contextlib.contextmanager
    def store_latency(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.store_seconds.labels(operation=operation).observe(time.perf_counter() - started)
