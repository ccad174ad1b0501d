"""Wan2.2-TI2V-5B's denoiser (48 latent channels in and out; a first frame, when given, replaces the noisy latents
where it is known and those tokens run at timestep 0): equal to diffusers' ``WanTransformer3DModel`` fed as
diffusers' TI2V pipelines feed it (``expand_timesteps``: per-token timesteps), with no references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.backbones.registry import load_denoiser

from .conftest import PARITY_RTOL, make_wan, rel_err

TI2V = dict(in_channels=48, out_channels=48, image_dim=None, added_kv_proj_dim=None)


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti2v")
    model = make_wan(5, **TI2V)
    model.save_pretrained(root / "transformer", safe_serialization=True)
    return root, model


def _inputs(seed: int, frames: int, height: int, width: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(batch, 48, frames, height, width, generator=g),
                timestep=torch.tensor([937.0, 211.0, 500.0][:batch]),
                text=torch.randn(batch, 512, 32, generator=g),
                first=torch.randn(batch, 48, 1, height, width, generator=g))


@pytest.mark.parametrize("fhw", [(3, 4, 6), (2, 6, 10)])
def test_text_to_video_equals_diffusers(ti2v_dir, fhw):
    """No first frame: every token at the step's timestep (diffusers' WanPipeline with expand_timesteps sends that
    timestep per token)."""
    path, wan = ti2v_dir
    den = load_denoiser(path)
    assert den.config.task == "ti2v" and den.config.condition_channels == 49
    x = _inputs(sum(fhw), *fhw)
    tokens = fhw[0] * (fhw[1] // 2) * (fhw[2] // 2)
    with torch.no_grad():
        want = wan(x["latents"], x["timestep"][:, None].expand(-1, tokens), x["text"], return_dict=False)[0]
        got = den(x["latents"], None, x["timestep"], x["text"], None)
    assert got.shape == want.shape == x["latents"].shape
    assert rel_err(got, want) < PARITY_RTOL


@pytest.mark.parametrize("fhw", [(3, 4, 6), (2, 6, 10)])
def test_image_to_video_equals_diffusers(ti2v_dir, fhw):
    """A first frame: diffusers' WanImageToVideoPipeline (expand_timesteps) gives the transformer ``(1 - m) * c +
    m * latents`` and timesteps ``m * t`` per token, m = 0 on the first latent frame; mvgen's condition carries the
    known mask and the first frame's latent (zeros elsewhere)."""
    path, wan = ti2v_dir
    den = load_denoiser(path)
    x = _inputs(7 + sum(fhw), *fhw)
    frames, height, width = fhw
    mask = torch.ones(1, 1, frames, height, width)
    mask[:, :, 0] = 0  # diffusers' first_frame_mask
    with torch.no_grad():
        hidden = (1 - mask) * x["first"] + mask * x["latents"]
        timestep = (mask[0, 0][:, ::2, ::2] * x["timestep"][:, None, None, None]).flatten(1)
        want = wan(hidden, timestep, x["text"], return_dict=False)[0]
        condition = torch.cat([(1 - mask).expand(2, -1, -1, -1, -1),
                               torch.cat([x["first"], torch.zeros(2, 48, frames - 1, height, width)], 2)], 1)
        got = den(x["latents"], condition, x["timestep"], x["text"], None)
        plain = den(x["latents"], None, x["timestep"], x["text"], None)
    assert rel_err(got, want) < PARITY_RTOL
    assert rel_err(got, plain) > 1e-3  # the first frame reaches the video


def test_references_and_sequence_parallel_layout(ti2v_dir):
    """References enter TI2V's own patch embedding (48 channels: no I2V condition trick); an isolated,
    zero-timestep reference stream caches as on every Wan."""
    path, _ = ti2v_dir
    den = load_denoiser(path, ref_attention="isolated", ref_timestep="zero")
    x = _inputs(3, 3, 4, 6)
    refs = torch.randn(2, 2, 48, 4, 6, generator=torch.Generator().manual_seed(9))
    condition = torch.cat([torch.zeros(2, 1, 3, 4, 6), torch.zeros(2, 48, 3, 4, 6)], 1)
    condition[:, 0, 0], condition[:, 1:, :1] = 1, x["first"]
    with torch.no_grad():
        live = den(x["latents"], condition, x["timestep"], x["text"], None, refs)
        cache = den.precompute_reference(refs, x["text"], None, (3, 4, 6))
        cached = den(x["latents"], condition, x["timestep"], x["text"], None, None, cache)
        without = den(x["latents"], condition, x["timestep"], x["text"], None)
    assert rel_err(cached, live) < 1e-5
    assert rel_err(live, without) > 1e-3


# ---- the pipeline: the embedded tiny-ti2v (its 48-channel VAE compresses 16x in space) against diffusers -----------
SIZE = dict(num_frames=9, height=64, width=64)


@pytest.fixture(scope="module")
def ti2v_pipe(tiny_cache):
    from engine.pipeline import MultiViewPipeline
    from engine.tiny import ensure_tiny

    root = ensure_tiny(tiny_cache, "tiny-ti2v")
    return root, MultiViewPipeline.from_pretrained(root, cache_root=tiny_cache)


def test_text_to_video_generation_equals_diffusers_wan_pipeline(ti2v_pipe):
    from diffusers import WanPipeline

    root, pipe = ti2v_pipe
    assert pipe.checkpoint.latent_channels == 48 and pipe.checkpoint.vae_scale_spatial == 16
    ours = pipe(None, [], "a person turns", "blurry", seed=5, steps=3, **SIZE)
    oracle = WanPipeline.from_pretrained(root)
    assert oracle.config.expand_timesteps
    oracle.set_progress_bar_config(disable=True)
    want = oracle(prompt="a person turns", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(5), output_type="np", **SIZE).frames[0]
    assert ours.shape == want.shape
    assert np.abs(ours.astype(int) - np.round(want * 255)).max() <= 1


def test_image_to_video_generation_equals_diffusers_wan_i2v_pipeline(ti2v_pipe):
    """The same checkpoint with a first frame: diffusers' WanImageToVideoPipeline with ``expand_timesteps`` (no
    image encoder), which replaces the first latent frame by the frame's latent and runs it at timestep 0."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    root, pipe = ti2v_pipe
    frame = np.random.default_rng(11).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ours = pipe(frame, [], "a person turns", "blurry", seed=6, steps=3, **SIZE)
    oracle = WanImageToVideoPipeline.from_pretrained(root, image_encoder=None, image_processor=None,
                                                     expand_timesteps=True)
    oracle.set_progress_bar_config(disable=True)
    want = oracle(image=Image.fromarray(frame), prompt="a person turns", negative_prompt="blurry",
                  num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(6),
                  output_type="np", **SIZE).frames[0]
    assert ours.shape == want.shape
    assert np.abs(ours.astype(int) - np.round(want * 255)).max() <= 1
    t2v = pipe(None, [], "a person turns", "blurry", seed=6, steps=3, **SIZE)
    assert np.abs(ours.astype(int) - t2v.astype(int)).mean() > 1  # the first frame reaches the video
