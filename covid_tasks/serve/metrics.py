"""Prometheus metrics of the inference service (text exposition at ``/metrics``).

Each app has its own ``CollectorRegistry``, so several apps in one process (tests) never share
counters. Names follow Prometheus conventions (``_total``, ``_seconds``).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

#: Request latency buckets (seconds): one image on a CPU takes tens of milliseconds; a batch of 32
#: with explanations takes seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """Counters, histogram and gauges of one app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("covid_serve_requests_total", "HTTP requests answered, by endpoint, status",
                                ["endpoint", "method", "status"], registry=r)
        self.errors = Counter("covid_serve_errors_total", "Requests answered with a 4xx or 5xx status",
                              ["endpoint", "status"], registry=r)
        self.latency = Histogram("covid_serve_request_duration_seconds", "Time to answer a request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("covid_serve_images_total", "Images classified, by predicted class and version",
                              ["predicted_class", "version"], registry=r)
        self.version = Gauge("covid_serve_model_version", "Registered version being served (0: none)",
                             registry=r)
        self.model_info = Gauge("covid_serve_model_info", "1 for the version being served",
                                ["name", "version", "run_id"], registry=r)
        self.swaps = Counter("covid_serve_model_swaps_total", "Versions swapped in (the first load included)",
                             registry=r)
        self.ready = Gauge("covid_serve_ready", "1 when a model is loaded", registry=r)
        self.registry_up = Gauge("covid_serve_registry_up", "1 when the last registry look-up succeeded",
                                 registry=r)
        self.failed_versions = Gauge("covid_serve_failed_versions", "Versions that could not be loaded",
                                     registry=r)

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()

    def swapped(self, served: Any) -> None:
        """Record a new served version."""
        self.model_info.clear()
        self.model_info.labels(served.name, served.version, served.run_id or "").set(1)
        self.version.set(float(served.version) if str(served.version).isdigit() else 0)
        self.swaps.inc()

    def render(self, status: dict[str, Any]) -> bytes:
        """The exposition text, with the gauges refreshed from ``ModelHolder.status()``."""
        self.ready.set(1 if status["ready"] else 0)
        self.registry_up.set(1 if status["registry"]["reachable"] else 0)
        self.failed_versions.set(len(status["failed_versions"]))
        return generate_latest(self.registry)
