"""The API's Prometheus metrics (``GET /metrics`` on the API's port, beside Triton's own on its metrics port).

Each app has its own registry, so two apps in one process (tests) never share counts.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)
OUTCOMES = ("completed", "failed", "cancelled", "interrupted")


class ApiMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("mvgen_api_requests", "HTTP requests answered, by method, route and status code",
                                ("method", "route", "status"), registry=self.registry)
        self.jobs = Counter("mvgen_api_jobs", "Jobs finished, by outcome (cancelled: deleted while running; "
                            "interrupted: the API stopped while it ran)", ("outcome",), registry=self.registry)
        self.job_duration = Histogram("mvgen_api_job_duration_seconds", "A job's time on the Triton server, from "
                                      "its start to its video on disk, by outcome", ("outcome",),
                                      buckets=JOB_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("mvgen_api_queue_wait_seconds", "Time a job waited in the queue for a worker",
                                    buckets=WAIT_BUCKETS, registry=self.registry)
        self.queue_length = Gauge("mvgen_api_queue_length", "Jobs waiting for a worker", registry=self.registry)
        self.running = Gauge("mvgen_api_running_jobs", "Jobs being generated now", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
