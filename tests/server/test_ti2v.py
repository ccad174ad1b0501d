"""Wan2.2-TI2V-5B (``tiny-ti2v``: 48 latent channels, a 16x spatial VAE, per-token timesteps) served by the real
tritonserver: text-to-video (no first frame) and image-to-video (a first frame) with references, each the video
``mvgen generate --deterministic`` makes of the same request, bit for bit; a size off TI2V's 32-pixel grid refused
in one line. One server for all of it."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engine.media import contact_sheet
from server.client import ClientError
from tests.server.conftest import SMALL
from tests.server.test_wan_family import _builds, _cli, _served

PROMPT = "the person of the references turns around"
# 32x64 pixels: one latent row and two latent columns of TI2V's 16x VAE; 9 frames: three latent frames, of which the
# first is the known one on image-to-video (its tokens run at timestep 0, the others at the step's)
SIZE = {**SMALL, "num_frames": 9, "height": 32, "width": 64}


def test_ti2v_served_equals_generate_with_and_without_a_first_frame(served_ti2v, images, tiny_cache, tmp_path):
    first, refs = images
    videos = {}
    requests = {name: dict(prompt=PROMPT, references=refs[:2], **frame, **SIZE)
                for name, frame in (("text_to_video", {}), ("image_to_video", {"first_frame": first}))}
    for name, values in requests.items():
        before = _builds(served_ti2v, "mvgen_denoiser")
        served = _served(served_ti2v, values)
        assert served.shape == (SIZE["num_frames"], SIZE["height"], SIZE["width"], 3), name
        assert served.std() > 10, name  # a real picture, not a saturated one (NaN latents decode to black)
        (tmp_path / name).mkdir()
        cli = _cli("tiny-ti2v", tiny_cache, tmp_path / name, values, "--deterministic")
        assert np.array_equal(cli, contact_sheet(served)), f"{name}: server vs `mvgen generate`"
        # the isolated reference stream (served_ti2v's CACHEABLE) built once for the request's steps, then released
        assert _builds(served_ti2v, "mvgen_denoiser") == (before[0] + 1, 0), name
        videos[name] = served
    # the first frame reaches the video (the tiny model makes noise: the videos differ, they do not resemble it)
    assert np.abs(videos["image_to_video"].astype(int) - videos["text_to_video"].astype(int)).mean() > 1
    # both at once: a call with a condition and one without never share a denoiser batch, and each video is the same
    with ThreadPoolExecutor(2) as pool:
        together = dict(zip(videos, pool.map(lambda values: _served(served_ti2v, values), requests.values())))
    assert all(np.array_equal(together[name], videos[name]) for name in videos)


def test_ti2v_server_refuses_a_size_off_its_grid(served_ti2v):
    """16x VAE x 2x2 patch: TI2V's sizes are multiples of 32 (Wan2.1's of 16), in the words `mvgen generate` uses."""
    with pytest.raises(ClientError, match=r"^height must be a positive multiple of 32, got 48 \(nearest: 32 or 64\)$"):
        _served(served_ti2v, dict(prompt=PROMPT, **{**SIZE, "height": 48}))


def test_a_ti2v_plan_gets_a_zero_condition_for_text_to_video(tiny_cache, tmp_path):
    """A TensorRT plan has no optional input: the loop of a repository around a TI2V plan sends a request without a
    first frame every input the plan's config declares, the condition as zeros (nothing known: the same call,
    tests/export/test_onnx_ti2v.py); the python denoiser gets none, as `mvgen generate` runs it."""
    import torch

    from engine import denoiser_io
    from engine.generation import DENOISER_INPUTS
    from engine.tiny import ensure_tiny
    from server.models import RemoteStages, load_checkpoint
    from server.plan_repository import write_repository
    from tests.server.test_plan_repository import _config, _fake_plan

    plan, cfg = _fake_plan(tmp_path, ensure_tiny(tiny_cache, "tiny-ti2v"), dtype="fp32")
    repo = write_repository(plan, tmp_path / "repo")
    loop = _config(repo / "mvgen" / "config.pbtxt")
    params = {name: {"string_value": value.string_value} for name, value in loop.parameters.items()}
    checkpoint = load_checkpoint({"parameters": params})
    b, f, h, w = 2, 3, 2, 4
    step = {**dict.fromkeys(DENOISER_INPUTS), "latents": torch.randn(b, 48, f, h, w),
            "timestep": torch.full((b,), 937.0), "text": torch.randn(b, cfg.text_len, cfg.text_dim)}
    on_plan = params["denoiser_plan"]["string_value"] == "true"  # what GenerateModel reads
    plan_loop = RemoteStages(None, checkpoint, False, False, denoiser_plan=on_plan)
    sent = {name: value for name, value in plan_loop._wire(step).items() if value is not None}
    plan_inputs = _config(repo / denoiser_io.DENOISER_MODEL_NAME / "config.pbtxt").input
    assert set(sent) == {t.name for t in plan_inputs}
    assert sent["condition"].shape == (b, 49, f, h, w) and not sent["condition"].any()
    assert RemoteStages(None, checkpoint, False, False)._wire(step)["condition"] is None
