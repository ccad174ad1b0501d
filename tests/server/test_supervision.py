"""Issue 23 on a real tritonserver serving ``tiny`` (a dedicated one: these tests kill its processes).

Each served model's stub is killed in turn (the denoiser under a request in flight, which fails at once naming it),
the denoiser's stub is stopped (SIGSTOP) under a request, and made to hang (a test hook: alive, never answering,
which only the call's bound catches): readiness goes false (the health endpoint and Triton's readiness of that
model), a request sent meanwhile is answered within its bound with one line naming the model, the model is restored
within a minute and the same request gives the same video as before the fault. The stream loop killed under a request
restarts tritonserver (Triton never ends that request otherwise). An out-of-memory error in the denoiser or the VAE
fails one request and gives back what it held (process-tree PSS). A model whose restoration keeps failing makes
liveness fail. A dead tritonserver ends ``mvgen serve`` with a non-zero code.
"""
from __future__ import annotations

import re
import time

import numpy as np
import pytest

from server.client import GenerationInputs, generate
from server.metrics import SupervisionMetrics
from tests.server.conftest import SERVED_MODELS
from tests.server.supervision_helpers import (CALL_TIMEOUT_S, RECOVERY_S, InFlight, fault_request, request, start,
                                              stop, tree_pss, watch_outage)

# the backend's own health check fails a call to a dead or stopped stub within about 2 s; margin for 2 busy cores
DETECTION_MARGIN_S = 5.0
RESTORE_DEADLINE_S = 4  # short, so that the liveness test waits little (a restoration here takes 4-7 s)
LONG = dict(steps=300, num_frames=9, height=64, width=64)  # still denoising seconds after its fault


@pytest.fixture(scope="module")
def supervised(tiny_cache, tmp_path_factory):
    server = start(tiny_cache, tmp_path_factory.mktemp("supervised"), "tiny",
                   "--restore-deadline", str(RESTORE_DEADLINE_S))
    yield server
    code = stop(server)
    assert code in (None, 0), f"mvgen serve exited with {code} on SIGINT:\n{''.join(server.output)[-2000:]}"


@pytest.fixture(scope="module")
def inputs():
    """The request every fault is checked with (a seeded first frame and three references, as ``images``)."""
    rng = np.random.default_rng(1234)
    first = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    return request((first, [rng.integers(0, 256, (40, 32, 3), dtype=np.uint8) for _ in range(3)]))


@pytest.fixture(scope="module")
def before(supervised, inputs):
    """Its video before any fault."""
    return generate(supervised.url, inputs, stream=False)


def assert_serves_as_before(server, inputs, before) -> None:
    for stream in (False, True):
        after = generate(server.url, inputs, stream=stream)
        assert np.array_equal(after, before), f"stream={stream}: max diff {np.abs(after.astype(int) - before).max()}"


def assert_outage(outage, fault_at: float, model: str) -> None:
    assert outage.not_ready_at is not None, f"readiness never went false after {model} was lost"
    assert outage.ready_at is not None, f"not ready again {RECOVERY_S:.0f} s after {model} was lost"
    assert outage.model_ready_seen_false, f"Triton kept reporting {model} ready during its outage"
    assert outage.refusal_s < CALL_TIMEOUT_S + DETECTION_MARGIN_S, f"a request waited {outage.refusal_s:.1f} s"
    assert "\n" not in outage.refusal, outage.refusal
    print(f"\n{model}: not ready {outage.not_ready_at - fault_at:.2f} s after the fault, serving again after "
          f"{outage.ready_at - fault_at:.1f} s; a request meanwhile got in {outage.refusal_s:.2f} s: {outage.refusal}")


def request_like(inputs: GenerationInputs, **changes) -> GenerationInputs:
    return GenerationInputs(**{**inputs.values, **changes})


def names(model: str, line: str) -> bool:
    """``line`` names ``model`` (or its instance, as Triton does: ``mvgen_0_0``), not merely a longer name."""
    return re.search(rf"(?<!\w){model}(?:_0_0)?(?!\w)", line) is not None


def wait_until(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def loop_of(model: str) -> str:
    """Where a request sent during the outage goes: the lost loop itself, else the stream."""
    return "mvgen" if model == "mvgen" else "mvgen_stream"


@pytest.mark.parametrize("model", ["mvgen", "mvgen_text_encoder", "mvgen_image_encoder", "mvgen_vae", "mvgen_denoiser"])
def test_a_killed_model_is_restored(supervised, inputs, before, model):
    """Killed idle, or (the denoiser) under a request in flight, which fails at once naming it."""
    assert model in SERVED_MODELS["tiny"]
    restarts = supervised.metric(SupervisionMetrics.RESTARTS, model=model)
    stub = supervised.stub(model)
    busy = model == "mvgen_denoiser"
    if busy:
        flight = InFlight(supervised, request_like(inputs, **LONG))
        flight.wait_steps(3)
    elif model == "mvgen":  # idle: its last request's worker has finished too (else the server restarts)
        wait_until(lambda: supervised.metric("mvgen_active_requests", model=model) == 0)
    stub.kill()
    killed = time.monotonic()
    outage = watch_outage(supervised, model, inputs.tensors(), loop_of(model), killed)
    if busy:
        flight.join(CALL_TIMEOUT_S + DETECTION_MARGIN_S)
        assert flight.error is not None, f"the request in flight succeeded although {model} was killed under it"
        assert names(model, flight.error) and "\n" not in flight.error, flight.error
        assert flight.ended - killed < CALL_TIMEOUT_S + DETECTION_MARGIN_S
    assert_outage(outage, killed, model)
    assert names(model, outage.refusal), outage.refusal
    assert_serves_as_before(supervised, inputs, before)
    assert supervised.metric(SupervisionMetrics.RESTARTS, model=model) == restarts + 1
    assert supervised.metric(SupervisionMetrics.HEALTHY) == len(SERVED_MODELS["tiny"])
    assert supervised.stub(model).pid != stub.pid


def test_a_loop_killed_with_requests_in_flight_restarts_the_server(supervised, inputs, before):
    """The stream loop killed under a request: Triton 2.51 would leave that request waiting forever (its response
    sender died with the stub), so tritonserver is restarted, which ends it with a connection error at once."""
    restarts = supervised.metric(SupervisionMetrics.SERVER_RESTARTS)
    flight = InFlight(supervised, request_like(inputs, **LONG))
    flight.wait_steps(3)
    supervised.stub("mvgen_stream").kill()
    killed = time.monotonic()
    outage = watch_outage(supervised, "mvgen_stream", inputs.tensors(), "mvgen_stream", killed)
    flight.join(CALL_TIMEOUT_S + DETECTION_MARGIN_S)
    assert flight.error is not None and "\n" not in flight.error, flight.error
    assert flight.ended - killed < CALL_TIMEOUT_S + DETECTION_MARGIN_S
    print(f"\nthe request in flight ended {flight.ended - killed:.2f} s after the kill: {flight.error}")
    assert_outage(outage, killed, "mvgen_stream")
    assert_serves_as_before(supervised, inputs, before)
    assert supervised.metric(SupervisionMetrics.SERVER_RESTARTS) == restarts + 1
    assert supervised.metric(SupervisionMetrics.HEALTHY) == len(SERVED_MODELS["tiny"])


def test_a_stopped_denoiser_is_restored(supervised, inputs, before):
    """SIGSTOP: the process is alive but answers nothing; the call in flight fails, the stub is killed and replaced."""
    stub = supervised.stub("mvgen_denoiser")
    flight = InFlight(supervised, request_like(inputs, **LONG))
    flight.wait_steps(3)
    stub.suspend()
    stopped = time.monotonic()
    outage = watch_outage(supervised, "mvgen_denoiser", inputs.tensors(), "mvgen_stream", stopped)
    flight.join(CALL_TIMEOUT_S + DETECTION_MARGIN_S)
    assert flight.error is not None and "mvgen_denoiser" in flight.error, flight.error
    assert flight.ended - stopped < CALL_TIMEOUT_S + DETECTION_MARGIN_S
    assert_outage(outage, stopped, "mvgen_denoiser")
    assert names("mvgen_denoiser", outage.refusal), outage.refusal
    assert_serves_as_before(supervised, inputs, before)
    assert stub.status() == "zombie", "the stopped stub was not killed"


def test_a_hung_denoiser_is_found_by_the_calls_bound(supervised, inputs, before):
    """A stub that stays alive (Triton's health check passes) but never answers: only the loop's bounded wait sees
    it; the request fails when its bound has passed, and the model is restored."""
    started = time.monotonic()
    video, error = fault_request(supervised, inputs, "hang:mvgen_denoiser:2")
    waited = time.monotonic() - started
    assert video is None and "mvgen_denoiser" in error and f"no answer within {CALL_TIMEOUT_S:.1f} s" in error, error
    assert CALL_TIMEOUT_S <= waited < CALL_TIMEOUT_S + DETECTION_MARGIN_S, f"the request waited {waited:.1f} s"
    outage = watch_outage(supervised, "mvgen_denoiser", inputs.tensors(), "mvgen", time.monotonic())
    assert_outage(outage, started + waited, "mvgen_denoiser")
    assert names("mvgen_denoiser", outage.refusal), outage.refusal
    assert_serves_as_before(supervised, inputs, before)


@pytest.mark.parametrize("model, call", [("mvgen_denoiser", 2), ("mvgen_vae", 3)])  # a later step; the decode
def test_out_of_memory_fails_one_request_and_gives_its_memory_back(supervised, inputs, before, model, call):
    ballast_mb = 256  # what the failing forward holds: ~13% of the tree, which a missing release would leave
    generate(supervised.url, inputs, stream=False)
    time.sleep(1)
    pss_before = tree_pss(supervised)
    video, error = fault_request(supervised, inputs, f"oom:{model}:{call}:{ballast_mb}")
    assert video is None and error.startswith(f"out of memory in {model}: ") and "\n" not in error, error
    assert supervised.health_status("ready") == 200
    assert np.array_equal(generate(supervised.url, inputs, stream=False), before)
    time.sleep(1)
    pss_after = tree_pss(supervised)
    change = (pss_after - pss_before) / pss_before
    print(f"\n{model} out of memory holding {ballast_mb} MiB: tree PSS {pss_before / 2**20:.0f} -> "
          f"{pss_after / 2**20:.0f} MiB ({change:+.1%}): {error}")
    assert abs(change) < 0.03, f"the tree's PSS changed by {change:+.1%} after the out-of-memory request"


def test_liveness_fails_while_a_restoration_keeps_failing(supervised, inputs, before):
    """The text encoder's model file is broken, then its stub killed: every reload fails, so once the restore
    deadline has passed liveness fails; repaired, the next attempt restores it."""
    script = supervised.repository / "mvgen_text_encoder" / "1" / "model.py"
    original = script.read_text()
    script.write_text(original.replace("def initialize(self, args):",
                                       "def initialize(self, args):\n        raise RuntimeError('broken by the test')"))
    try:
        supervised.stub("mvgen_text_encoder").kill()
        deadline = time.monotonic() + 40
        while supervised.health_status("live") == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert supervised.health_status("live") == 503, "liveness held while the restoration kept failing"
        assert supervised.health_status("ready") == 503
        assert supervised.wait_output("restoring mvgen_text_encoder failed", 1)
    finally:
        script.write_text(original)
    deadline = time.monotonic() + 60
    while supervised.health_status("ready") != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert supervised.health_status("live") == 200 and supervised.health_status("ready") == 200
    assert_serves_as_before(supervised, inputs, before)


def test_a_dead_tritonserver_ends_mvgen_serve_with_an_error(supervised):
    """Last in this module: the server goes. ``mvgen serve`` exits non-zero, so a container is restarted."""
    supervised.tritonserver.kill()
    code = supervised.process.wait(30)
    assert code != 0
    assert supervised.wait_output("tritonserver exited with code -9", 5), "".join(supervised.output)[-1000:]
