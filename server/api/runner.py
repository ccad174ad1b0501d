"""The jobs' queue and workers: jobs run in submission order, at most ``workers`` at once on the Triton server.

The queue is bounded: a submission while ``max_queue`` jobs wait is refused (429). A worker takes the next job
only while Triton is ready (the server and ``mvgen_stream``), so jobs wait in the queue while the server starts or
restarts. Each worker streams its job from ``mvgen_stream``: every step updates the job's progress, and a job
deleted while it runs is cancelled on the server at its next step (the progress callback raises, which makes
``server.client.generate`` cancel the stream). Finished frames become ``video.mp4`` (H.264, as ``mvgen generate``
writes it), ``thumbnail.png`` (the first frame) and ``spritesheet.png`` (every frame, ``mvgen generate``'s contact
sheet: lossless). Stopping lets running jobs finish for a grace period, then cancels them (they end ``failed``,
``interrupted``, as after a crash); queued jobs stay queued for the next start.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
import traceback
from pathlib import Path

from engine.media import write_contact_sheet, write_mp4

from ..client import ClientError
from .errors import queue_full
from .metrics import ApiMetrics
from .store import INTERRUPTED, VARIANTS, Job, Store

EXPIRE_INTERVAL_S = 60.0
READY_POLL_S = 1.0  # how often a worker asks again whether a server that was not ready now is


class Cancelled(Exception):
    """Raised from a job's progress callback to cancel its request on the server."""


class JobRunner:
    def __init__(self, store: Store, backend, metrics: ApiMetrics, max_queue: int, workers: int | None = None):
        self.store, self.backend, self.metrics, self.max_queue = store, backend, metrics, max_queue
        self.workers = workers  # None: the served model's max_concurrency, read at start
        self._queue: collections.deque[str] = collections.deque()
        self._enqueued: dict[str, float] = {}
        self._cancelled: dict[str, str] = {}  # running job -> why it must stop ("deleted", "stopped")
        self._running: set[str] = set()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- life cycle ---------------------------------------------------------------------------------------------
    def start(self, queued: list[str]) -> None:
        """Queue ``queued`` (jobs stored before a restart), start the workers and the expiry thread."""
        with self._cond:
            for job_id in queued:
                self._enqueue(job_id)
        count = self.workers or self._served_concurrency()
        self._threads = [threading.Thread(target=self._work, name=f"mvgen-api-job-{i}", daemon=True)
                         for i in range(count)]
        self._threads.append(threading.Thread(target=self._expire, name="mvgen-api-expiry", daemon=True))
        for thread in self._threads:
            thread.start()

    def _served_concurrency(self) -> int:
        from .backend import DEFAULT_CONCURRENCY, NotReady

        try:
            return self.backend.describe().max_concurrency
        except NotReady:
            return DEFAULT_CONCURRENCY

    def stop(self, grace_s: float) -> None:
        """Take no more jobs; give the running ones ``grace_s`` to finish, then cancel them."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
            deadline = time.monotonic() + grace_s
            while self._running and self._cond.wait(max(0.0, deadline - time.monotonic())):
                pass
            for job_id in self._running:
                self._cancelled.setdefault(job_id, "stopped")
        for thread in self._threads:
            thread.join(timeout=60)

    # ---- submissions ----------------------------------------------------------------------------------------------
    def check_room(self) -> None:
        """``ApiError`` 429 when ``max_queue`` jobs already wait (checked again, atomically, by ``submit``)."""
        if len(self._queue) >= self.max_queue:
            raise queue_full(self.max_queue)

    def submit(self, values: dict, model: str, fps: int) -> Job:
        """Store a job and queue it; ``ApiError`` 429 when ``max_queue`` jobs already wait. The inputs are written
        outside the queue's lock; a submission that lost the last place to another meanwhile is removed again."""
        self.check_room()
        job = self.store.create(values, model, fps)
        with self._cond:
            if len(self._queue) >= self.max_queue:
                self.store.delete(job.id)
                raise queue_full(self.max_queue)
            self._enqueue(job.id)
        return job

    def _enqueue(self, job_id: str) -> None:
        self._queue.append(job_id)
        self._enqueued[job_id] = time.monotonic()
        self.metrics.queue_length.set(len(self._queue))
        self._cond.notify()

    def delete(self, job_id: str) -> Job | None:
        """Remove a job (a running one is cancelled on the server at its next step); None when there is none."""
        with self._cond:
            if job_id in self._queue:
                self._queue.remove(job_id)
                self._enqueued.pop(job_id, None)
                self.metrics.queue_length.set(len(self._queue))
            if job_id in self._running:
                self._cancelled[job_id] = "deleted"
            return self.store.delete(job_id)

    def counts(self) -> dict:
        with self._cond:
            return {"queued": len(self._queue), "running": len(self._running)}

    # ---- workers --------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while self._next_job_waits():
            if self.backend.not_ready_reason() is not None:  # Triton starting or restarting: the jobs stay queued
                self._stopping.wait(READY_POLL_S)
                continue
            claimed = self._claim()
            if claimed is None:
                continue
            job, values = claimed
            try:
                self._run(job, values)
            finally:
                with self._cond:
                    self._running.discard(job.id)
                    self._cancelled.pop(job.id, None)
                    self.metrics.running.set(len(self._running))
                    self._cond.notify_all()

    def _next_job_waits(self) -> bool:
        """Block until a job is queued (True) or the runner stops (False)."""
        with self._cond:
            while not self._queue and not self._stopping.is_set():
                self._cond.wait()
            return not self._stopping.is_set()

    def _claim(self) -> tuple[Job, dict] | None:
        """The next queued job, marked running, and its inputs; None when another worker took it or it was deleted."""
        with self._cond:
            if not self._queue or self._stopping.is_set():
                return None
            job_id = self._queue.popleft()
            self.metrics.queue_length.set(len(self._queue))
            self.metrics.queue_wait.observe(time.monotonic() - self._enqueued.pop(job_id))
            job = self.store.start(job_id)
            if job is None:
                return None
            values = self.store.inputs(job_id)  # read before a delete could remove them
            self._running.add(job_id)
            self.metrics.running.set(len(self._running))
            return job, values

    def _run(self, job: Job, values: dict) -> None:
        started = time.monotonic()
        outcome = "failed"
        try:
            frames = self.backend.generate(values, lambda step, total: self._progress(job, step, total))
            done = self.store.complete(job.id, write_outputs(frames, self.store.tmp_dir / job.id, job.fps))
            outcome = "completed" if done is not None else "cancelled"
        except Cancelled:
            if self._cancelled.get(job.id) == "stopped":
                self.store.fail(job.id, "interrupted", INTERRUPTED)
                outcome = "interrupted"
            else:
                outcome = "cancelled"
        except ClientError as error:
            self.store.fail(job.id, "generation_failed", f"the Triton server failed this job: {error}")
        except Exception as error:  # a bug or a full disk: the job fails, the worker goes on
            traceback.print_exc(file=sys.stderr)
            words = (str(error).strip().splitlines() or [""])[0]
            self.store.fail(job.id, "internal_error", f"internal error: {type(error).__name__}: {words}")
        finally:
            self.metrics.jobs.labels(outcome).inc()
            self.metrics.job_duration.labels(outcome).observe(time.monotonic() - started)

    def _progress(self, job: Job, step: int, total: int) -> None:
        if job.id in self._cancelled:
            raise Cancelled(self._cancelled[job.id])
        self.store.set_progress(job.id, min(99, round(100 * step / max(total, 1))))

    def _expire(self) -> None:
        interval = min(EXPIRE_INTERVAL_S, max(1.0, self.store.retention_s / 4))
        while not self._stopping.wait(interval):
            self.store.expire()


def write_outputs(frames, folder: Path, fps: int) -> Path:
    """``video.mp4``, ``thumbnail.png`` and ``spritesheet.png`` of ``frames`` (uint8 [F, H, W, 3]) in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    write_mp4(frames, folder / VARIANTS["video"][0], fps=int(fps))
    Image.fromarray(frames[0]).save(folder / VARIANTS["thumbnail"][0])
    write_contact_sheet(frames, folder / VARIANTS["spritesheet"][0])
    return folder
