"""One model of the served tree computes at a time on a CPU device.

On a CPU every served model (encoders, VAE, denoiser) runs its ops on all the cores (torch's intra-op threads).
Two models computing at once, as concurrent requests make them (request A's VAE decode during request B's
denoiser step), put twice as many busy threads as cores on the machine, and their OpenMP barriers then wait on
descheduled threads: measured on 2 cores, four concurrent requests of mixed shapes finished at a quarter of the
solo throughput. Taking turns on the whole machine keeps each call at its solo speed, so throughput never falls
below solo. A GPU device shares its cores through its own scheduler: no lock there.

The lock is an advisory ``flock`` on a file of the model repository, held around each model's computation; the
loop models (which only call the others over BLS) never take it, so no model waits on a lock its callee needs.
"""
from __future__ import annotations

import contextlib
import fcntl
import os


class ComputeLock:
    """``with lock:`` runs the body while no other model of the tree holds the lock (``path`` None: no lock)."""

    def __init__(self, path: str | None):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if path else None

    def __enter__(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
