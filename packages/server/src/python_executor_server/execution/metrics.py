"""Prometheus metrics of one app instance (own registry: no import-time globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.submitted = Counter(
            "pyexec_executions_submitted", "Executions accepted.", registry=self.registry
        )
        self.finished = Counter(
            "pyexec_executions_finished",
            "Executions finished, by final status.",
            ["status"],
            registry=self.registry,
        )
        self.running = Gauge("pyexec_executions_running", "Running now.", registry=self.registry)
        self.queue_depth = Gauge(
            "pyexec_queue_depth", "Executions waiting for a worker.", registry=self.registry
        )
        self.request_seconds = Histogram(
            "pyexec_http_request_seconds",
            "HTTP request latency.",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30),
        )
