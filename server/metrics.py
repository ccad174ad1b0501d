"""Custom Prometheus metrics of the served models, next to Triton's own (``nv_inference_*``) on ``/metrics``.

Created through the python backend's ``MetricFamily`` API; every series carries a ``model`` label. The
backend requires a ``MetricFamily`` to outlive its ``Metric`` objects, so both are kept on the instance,
and its metric messages are not thread-safe (concurrent updates from worker threads crash tritonserver
2.51 in ``Metric::LoadFromSharedMemory``), so every update holds one lock per process.
"""
from __future__ import annotations

import threading

_LOCK = threading.Lock()

STEP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
WAIT_BUCKETS = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]
COUNT_BUCKETS = [1, 2, 4, 8, 16, 32]
OUTCOMES = ("success", "rejected", "cancelled", "error")


class LoopMetrics:
    """``mvgen`` / ``mvgen_stream``: per-step latency, queue wait and length, active requests, outcomes, and the
    bytes each denoiser call carries."""

    def __init__(self, pb, model: str):
        kind = pb.MetricFamily
        labels = {"model": model}
        self.families = [
            kind("mvgen_step_duration_seconds", "One denoising step as the loop sees it (denoiser call incl. "
                 "the batching wait, guidance, scheduler step)", kind.HISTOGRAM),
            kind("mvgen_queue_wait_seconds", "Time a request waited for a free loop worker", kind.HISTOGRAM),
            kind("mvgen_active_requests", "Requests being generated now", kind.GAUGE),
            kind("mvgen_requests_total", "Finished requests by outcome", kind.COUNTER),
            kind("mvgen_loop_queue_requests", "Requests accepted by the loop that have not reached the denoiser yet "
                 "(waiting for a loop worker, or in the encoders): what grows when the server is short of capacity",
                 kind.GAUGE),
            kind("mvgen_denoiser_input_bytes_total", "Bytes of input tensors the loop sent to the denoiser models",
                 kind.COUNTER),
            kind("mvgen_denoiser_calls_total", "Denoiser calls the loop made (one per request and step)", kind.COUNTER),
        ]
        step, wait, active, requests, queue, sent, calls = self.families
        self.step = step.Metric(labels=labels, buckets=STEP_BUCKETS)
        self.wait = wait.Metric(labels=labels, buckets=WAIT_BUCKETS)
        self.active = active.Metric(labels=labels)
        self.outcomes = {o: requests.Metric(labels={**labels, "outcome": o}) for o in OUTCOMES}
        self.queue, self.sent, self.calls = (f.Metric(labels=labels) for f in (queue, sent, calls))

    def request_queued(self) -> None:
        with _LOCK:
            self.queue.increment(1)

    def request_dequeued(self) -> None:
        with _LOCK:
            self.queue.increment(-1)

    def observe_denoiser_call(self, nbytes: int) -> None:
        with _LOCK:
            self.sent.increment(nbytes)
            self.calls.increment(1)

    def request_started(self, waited: float) -> None:
        with _LOCK:
            self.wait.observe(waited)
            self.active.increment(1)

    def request_refused(self) -> None:
        """Refused on arrival (the server drains, or a model it needs is being restored): never started."""
        with _LOCK:
            self.outcomes["rejected"].increment(1)

    def request_finished(self, outcome: str) -> None:
        with _LOCK:
            self.active.increment(-1)
            self.outcomes[outcome].increment(1)

    def observe_step(self, seconds: float) -> None:
        with _LOCK:
            self.step.observe(seconds)


class BatchMetrics:
    """``mvgen_denoiser``: how many rows and requests each dynamic batch held, and its reference K/V caches."""

    def __init__(self, pb, model: str):
        kind = pb.MetricFamily
        labels = {"model": model}
        self.families = [
            kind("mvgen_denoiser_batch_rows", "Rows (cond + uncond of each request) per denoiser batch", kind.HISTOGRAM),
            kind("mvgen_denoiser_batch_requests", "Requests per denoiser batch", kind.HISTOGRAM),
            kind("mvgen_reference_cache_builds_total", "Reference K/V caches built (one per request and expert, "
                 "again only after an eviction)", kind.COUNTER),
            kind("mvgen_reference_cache_entries", "Requests whose reference K/V the denoiser holds now", kind.GAUGE),
            kind("mvgen_reference_cache_bytes", "Bytes of reference K/V the denoiser holds now", kind.GAUGE),
        ]
        self.rows, self.requests = (f.Metric(labels=labels, buckets=COUNT_BUCKETS) for f in self.families[:2])
        self.builds, self.entries, self.bytes = (f.Metric(labels=labels) for f in self.families[2:])

    def observe_batch(self, rows: int, requests: int) -> None:
        with _LOCK:
            self.rows.observe(rows)
            self.requests.observe(requests)

    def observe_caches(self, built: int, entries: int, nbytes: int) -> None:
        with _LOCK:
            self.builds.increment(built)
            self.entries.set(entries)
            self.bytes.set(nbytes)


HEALTH_METRIC = "mvgen_denoiser_workers_healthy"


class WorkerHealth:
    """A sequence/CFG-parallel denoiser's workers: 1 while they answer, 0 once one is lost (for Prometheus; the
    model also reports the loss to ``server.supervisor``, which reloads it)."""

    def __init__(self, pb, model: str):
        kind = pb.MetricFamily
        self.family = kind(HEALTH_METRIC, "1 while every worker of the parallel denoiser answers, 0 once one is "
                           "lost (the model is then reloaded)", kind.GAUGE)
        self.gauge = self.family.Metric(labels={"model": model})

    def set(self, healthy: bool) -> None:
        with _LOCK:
            self.gauge.set(1 if healthy else 0)

    def lost(self, reason: str) -> None:
        self.set(False)


class SupervisionMetrics:
    """``mvgen serve``'s own metrics (``server.supervisor``): restorations per model and how many models can serve.
    They live in the launcher, not in a model (a model's counters would die with it), and are served on the health
    port's ``/metrics`` after Triton's page (``server.health``), so one scrape has both."""

    RESTARTS = "mvgen_model_restarts_total"
    SERVER_RESTARTS = "mvgen_tritonserver_restarts_total"
    HEALTHY = "mvgen_models_healthy"
    SERVED = "mvgen_models_served"

    def __init__(self, models: list[str]):
        self._lock = threading.Lock()
        self.restarts = {model: 0 for model in models}
        self.server_restarts = 0
        self.healthy = len(models)

    def restarted(self, model: str) -> None:
        with self._lock:
            self.restarts[model] = self.restarts.get(model, 0) + 1

    def server_restarted(self) -> None:
        with self._lock:
            self.server_restarts += 1

    def set_healthy(self, count: int) -> None:
        with self._lock:
            self.healthy = count

    def render(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            lines = [f"# HELP {self.RESTARTS} Times a served model was restored after its process died or hung",
                     f"# TYPE {self.RESTARTS} counter"]
            lines += [f'{self.RESTARTS}{{model="{model}"}} {count}' for model, count in sorted(self.restarts.items())]
            lines += [f"# HELP {self.SERVER_RESTARTS} Times tritonserver was restarted to release the requests a lost "
                      "loop model stranded", f"# TYPE {self.SERVER_RESTARTS} counter",
                      f"{self.SERVER_RESTARTS} {self.server_restarts}"]
            lines += [f"# HELP {self.HEALTHY} Served models that can serve now (not down or being restored)",
                      f"# TYPE {self.HEALTHY} gauge", f"{self.HEALTHY} {self.healthy}",
                      f"# HELP {self.SERVED} Models this server serves", f"# TYPE {self.SERVED} gauge",
                      f"{self.SERVED} {len(self.restarts)}"]
        return "\n".join(lines) + "\n"
