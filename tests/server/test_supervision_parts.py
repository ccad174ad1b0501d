"""The supervision's parts without a server: the call bound's formula (``server.call_bounds``), the state the
supervisor and the models exchange (``server.serving_state``), the test-fault syntax (``server.fault_injection``),
the health endpoint (``server.health``) and its metrics text (``server.metrics.SupervisionMetrics``)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.request import make_request
from server.call_bounds import CallBounds, request_work
from server.fault_injection import Fault, out_of_memory
from server.health import HealthEndpoint
from server.launcher import free_port
from server.metrics import SupervisionMetrics
from server.serving_state import ServingState, StateDirectory


@pytest.fixture(scope="module")
def checkpoint(tiny_cache):
    return Checkpoint.load(tiny_cache / "tiny-v2", None)


def test_the_bound_of_a_wan14b_480p_request_as_the_readme_states():
    """81 frames at 480x832 with 3 references at the video's size, guided: 2 x 37440 tokens -> 60 + 74.9 s."""
    tokens = 21 * (480 // 16) * (832 // 16) + 3 * (480 // 16) * (832 // 16)
    assert tokens == 37440
    assert CallBounds().bound_s(2 * tokens, 1) == pytest.approx(134.88)
    assert CallBounds().bound_s(2 * tokens, 4) == pytest.approx(60 + 4 * 74.88)


def test_request_work_counts_rows_video_and_reference_tokens(checkpoint):
    frame = torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()

    def work(**values):
        return request_work(checkpoint, make_request(checkpoint.defaults, checkpoint.limits, prompt="p",
                                                     first_frame=frame, **values))

    guided = work(num_frames=9, height=64, width=64, guidance_scale=5.0)  # 3 latent frames x 4 x 4 tokens, 2 rows
    assert guided == 2 * 48
    assert work(num_frames=9, height=64, width=64, guidance_scale=1.0) == 48
    references = [torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()] * 2  # fitted to the video's 64x64: 16 each
    assert work(num_frames=9, height=64, width=64, guidance_scale=5.0, references=references) == 2 * (48 + 32)


@pytest.mark.parametrize("base, per_ktoken", [(0, 1), (-1, 1), (1, -0.5)])
def test_the_bound_refuses_values_that_are_no_bound(base, per_ktoken):
    with pytest.raises(ValueError, match="call timeout"):
        CallBounds(base, per_ktoken)


def test_state_round_trip_and_refusals(tmp_path):
    supervisor, model = StateDirectory(tmp_path / "state").create(), StateDirectory(tmp_path / "state")
    needed = ("mvgen_text_encoder", "mvgen_denoiser")
    assert model.read_state().refusal(needed) is None
    supervisor.write_state(ServingState(down={"mvgen_denoiser": "its process (pid 7) died"}))
    assert model.read_state().refusal(needed) == ("mvgen_denoiser is being restored (its process (pid 7) died); "
                                                  "retry in a few seconds")
    assert model.read_state().refusal(("mvgen_vae",)) is None
    supervisor.write_state(ServingState(draining=True))
    assert model.read_state().refusal(()).startswith("the server is shutting down")
    assert StateDirectory(None).read_state() == ServingState()


def test_reports_are_taken_once(tmp_path):
    state = StateDirectory(tmp_path / "state").create()
    state.report("mvgen_vae", "no answer within 8.0 s", kill=True, at=12.5)
    state.report("mvgen_denoiser", "its workers are lost", kill=False)
    taken = {r.model: r for r in state.take_reports()}
    assert set(taken) == {"mvgen_vae", "mvgen_denoiser"}
    assert (taken["mvgen_vae"].kill, taken["mvgen_vae"].at, taken["mvgen_denoiser"].kill) == (True, 12.5, False)
    assert state.take_reports() == []


def test_in_flight_counts(tmp_path):
    state = StateDirectory(tmp_path / "state").create()
    assert state.in_flight("mvgen") == 0
    state.set_in_flight("mvgen", 3)
    assert state.in_flight("mvgen") == 3
    state.clear_in_flight("mvgen")
    assert state.in_flight("mvgen") == 0


@pytest.mark.parametrize("text, expected", [
    ("oom:mvgen_denoiser:2", Fault("oom", "mvgen_denoiser", 2, 64)),
    ("oom:mvgen_vae:3:256", Fault("oom", "mvgen_vae", 3, 256)),
    ("hang:mvgen_denoiser_2:1", Fault("hang", "mvgen_denoiser_2", 1, 64)),
])
def test_fault_syntax(text, expected):
    assert Fault.parse(text) == expected


@pytest.mark.parametrize("text", ["crash:mvgen_vae:1", "oom:mvgen_vae", "oom:mvgen_vae:0", "oom:mvgen_vae:x",
                                  "oom:mvgen_vae:1:2:3"])
def test_fault_syntax_refused_in_one_line(text):
    with pytest.raises(ValueError, match=r"^mvgen_fault must be KIND:MODEL:CALL\[:MIB\]"):
        Fault.parse(text)


def test_out_of_memory_hook_raises_torch_type_and_is_removed():
    layer = torch.nn.Linear(2, 2)
    with out_of_memory(1):
        with pytest.raises(torch.OutOfMemoryError, match="Linear ran out of memory holding 1 MiB"):
            layer(torch.zeros(1, 2))
    assert layer(torch.zeros(1, 2)).shape == (1, 2)


def test_health_endpoint_answers_what_its_checks_say():
    port = free_port()
    reasons = {"ready": ["mvgen_vae is down: its process (pid 9) died"], "live": []}
    endpoint = HealthEndpoint("127.0.0.1", port, lambda: reasons["ready"], lambda: reasons["live"],
                              lambda: "# triton\n").start()
    try:
        def get(path):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, error.read().decode()

        status, body = get("/health/ready")
        assert status == 503 and json.loads(body)["reasons"] == reasons["ready"]
        assert get("/health/live")[0] == 200
        reasons["ready"] = []
        assert get("/health/ready")[0] == 200
        assert get("/metrics") == (200, "# triton\n")
        assert get("/nothing")[0] == 404
    finally:
        endpoint.stop()


def test_supervision_metrics_text():
    metrics = SupervisionMetrics(["mvgen", "mvgen_vae"])
    metrics.restarted("mvgen_vae")
    metrics.set_healthy(1)
    text = metrics.render()
    assert 'mvgen_model_restarts_total{model="mvgen_vae"} 1\n' in text
    assert 'mvgen_model_restarts_total{model="mvgen"} 0\n' in text
    assert "mvgen_models_healthy 1\n" in text and "mvgen_models_served 2\n" in text
    assert "# TYPE mvgen_model_restarts_total counter" in text and "# TYPE mvgen_models_healthy gauge" in text

