"""Graceful shutdown on a real tritonserver (issue 23): SIGTERM to ``mvgen serve`` while a request is in flight.

Readiness goes false at once (liveness holds), a request sent after the signal is refused in one line, the request
in flight completes with its video, and ``mvgen serve`` exits 0 within ``--shutdown-grace``.
"""
from __future__ import annotations

import signal
import time

import numpy as np

from server.client import GenerationInputs
from tests.server.supervision_helpers import InFlight, answer, request, start

GRACE_S = 30.0
LONG = dict(steps=300, num_frames=9, height=64, width=64)  # several seconds of denoising on tiny


def test_sigterm_drains_then_exits_zero(tiny_cache, tmp_path):
    server = start(tiny_cache, tmp_path, "tiny", "--shutdown-grace", str(GRACE_S), "--warmup", "none")
    try:
        rng = np.random.default_rng(1234)
        first = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
        inputs = request((first, [rng.integers(0, 256, (40, 32, 3), dtype=np.uint8) for _ in range(3)]))
        flight = InFlight(server, GenerationInputs(**{**inputs.values, **LONG}))
        flight.wait_steps(3)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert server.wait_output("mvgen serve: draining", 5), "".join(server.output)[-1000:]
        assert server.health_status("ready") == 503 and server.health_status("live") == 200
        for loop in ("mvgen", "mvgen_stream"):
            refusal = answer(server, inputs.tensors(), loop)
            assert refusal.startswith("the server is shutting down") and "\n" not in refusal, refusal
        assert flight.ended is None, "the request in flight ended before the refusals were checked: make it longer"
        code = server.process.wait(GRACE_S + 30)
        exited = time.monotonic() - signalled
        flight.join(5)
        assert flight.error is None, flight.error
        assert len(flight.progress) == LONG["steps"] and flight.video is not None
        assert code == 0, "".join(server.output)[-1000:]
        assert exited < GRACE_S, f"mvgen serve took {exited:.1f} s to exit"
        print(f"\nthe request in flight finished {flight.ended - signalled:.1f} s after SIGTERM; "
              f"mvgen serve exited 0 after {exited:.1f} s")
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
