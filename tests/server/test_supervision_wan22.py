"""Issue 23 on ``tiny-wan22`` (Wan2.2's two experts, each its own Triton model), a dedicated real tritonserver.

The second expert is killed while a request is still in the first expert's steps: the request waits (within its
bound) for the restored expert, which builds the request's state from the inputs the loop sends it, and finishes
with the same video as without the fault; a request arriving during the outage is refused naming the expert. Last,
a second SIGTERM during the drain stops ``mvgen serve`` at once.
"""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from server.client import GenerationInputs, generate
from server.metrics import SupervisionMetrics
from tests.server.conftest import SERVED_MODELS
from tests.server.supervision_helpers import (RECOVERY_S, InFlight, request, start, stop, watch_outage)

CALL_TIMEOUT_S = 30.0  # long enough for the request in flight to wait out the expert's restoration
# about a quarter of the steps run the first expert (boundary_ratio 0.9 at shift 3): seconds of them here;
# at most 300 steps (UniPC over more repeats timesteps and asserts)
LONG = dict(steps=300, num_frames=9, height=64, width=64)
EXPERT_2 = "mvgen_denoiser_2"


@pytest.fixture(scope="module")
def supervised(tiny_cache, tmp_path_factory):
    server = start(tiny_cache, tmp_path_factory.mktemp("supervised-wan22"), "tiny-wan22",
                   "--call-timeout", str(CALL_TIMEOUT_S))
    yield server
    code = stop(server)
    assert code in (None, 128 + signal.SIGTERM), f"mvgen serve exited with {code}"


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1234)
    first = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    return request((first, [rng.integers(0, 256, (40, 32, 3), dtype=np.uint8) for _ in range(3)]))


def test_a_request_outlives_the_loss_of_the_expert_it_has_not_reached(supervised, inputs):
    assert EXPERT_2 in SERVED_MODELS["tiny-wan22"]
    long = GenerationInputs(**{**inputs.values, **LONG})
    uninterrupted = generate(supervised.url, long)
    restarts = supervised.metric(SupervisionMetrics.RESTARTS, model=EXPERT_2)
    stub = supervised.stub(EXPERT_2)
    flight = InFlight(supervised, long)
    flight.wait_steps(3)
    assert supervised.metric("mvgen_denoiser_calls_total", model="mvgen_stream") > 0
    stub.kill()
    killed = time.monotonic()
    outage = watch_outage(supervised, EXPERT_2, inputs.tensors(), "mvgen", killed)
    assert outage.not_ready_at is not None and outage.ready_at is not None, outage
    assert outage.model_ready_seen_false
    assert outage.ready_at - killed < RECOVERY_S
    assert EXPERT_2 in outage.refusal and outage.refusal_s < 2, outage.refusal
    flight.join(CALL_TIMEOUT_S + 10)
    assert flight.error is None, flight.error
    assert len(flight.progress) == LONG["steps"]
    assert np.array_equal(flight.video, uninterrupted), "the request that waited for the expert changed its video"
    assert supervised.metric(SupervisionMetrics.RESTARTS, model=EXPERT_2) == restarts + 1
    assert supervised.stub(EXPERT_2).pid != stub.pid
    print(f"\n{EXPERT_2}: serving again after {outage.ready_at - killed:.1f} s; the request in flight finished "
          f"{flight.ended - killed:.1f} s after the kill with the same video; meanwhile: {outage.refusal}")


def test_a_second_signal_stops_at_once(supervised, inputs):
    """Last in this module: SIGTERM drains (a request is in flight), a second SIGTERM ends everything now."""
    flight = InFlight(supervised, GenerationInputs(**{**inputs.values, **LONG}))
    flight.wait_steps(3)
    supervised.process.send_signal(signal.SIGTERM)
    assert supervised.wait_output("mvgen serve: draining", 10)
    assert supervised.health_status("ready") == 503
    supervised.process.send_signal(signal.SIGTERM)
    second = time.monotonic()
    code = supervised.process.wait(10)
    assert code == 128 + signal.SIGTERM
    assert time.monotonic() - second < 5
    flight.join(10)
    assert flight.error is not None, "the request in flight finished although the server was stopped at once"
