"""Denoiser parity against diffusers' WanTransformer3DModel (the oracle we did not write)."""
from __future__ import annotations

import pytest
import torch

from engine.backbones.registry import load_denoiser
from engine.streams.positions import grid_positions, rd_rope_positions

from .conftest import PARITY_RTOL, inputs, rel_err

SHAPES = [(1, 4, 6), (3, 6, 8), (2, 10, 4)]  # latent (frames, height, width); awkward, non-square


def diffusers_velocity(wan, x, ref_latents=None):
    """diffusers on the video, optionally with references appended as fully known frames (I2V: 36-ch convention;
    T2V: the clean latents as further frames)."""
    latents, condition = x["latents"], x["condition"]
    if ref_latents is not None:
        refs = ref_latents.transpose(1, 2)  # [B, 16, R, H, W]
        latents = torch.cat([latents, refs], dim=2)
        if condition is not None:
            condition = torch.cat([condition, torch.cat([torch.ones_like(refs[:, :4]), refs], dim=1)], dim=2)
    hidden = latents if condition is None else torch.cat([latents, condition], dim=1)
    out = wan(hidden, x["timestep"], x["text"], x["image_context"], return_dict=False)[0]
    return out[:, :, : x["latents"].shape[2]]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ref_mode", ["dual_stream", "token_concat"])
@pytest.mark.parametrize("no_refs", ["none", "empty"])
def test_without_references_equals_wan(family_dir, shape, ref_mode, no_refs):
    path, wan = family_dir
    den = load_denoiser(path, ref_mode=ref_mode)
    x = inputs(torch.Generator().manual_seed(hash((shape, ref_mode)) % 2**31), frames=shape[0], height=shape[1],
               width=shape[2], config=den.config)
    with torch.no_grad():
        want = diffusers_velocity(wan, x)
        refs = x.pop("ref_latents")
        assert refs.shape[1] == 0
        got = den(**x, ref_latents=None if no_refs == "none" else refs)
    assert got.shape == want.shape
    assert rel_err(got, want) < PARITY_RTOL


@pytest.mark.parametrize("ref_mode", ["dual_stream", "token_concat"])
@pytest.mark.parametrize("num_refs", [1, 3])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_zero_lora_reference_stream_equals_wan_with_appended_frames(family_dir, ref_mode, num_refs, shape):
    path, wan = family_dir
    den = load_denoiser(path, ref_mode=ref_mode, ref_rope="shared", ref_timestep="shared", ref_attention="full")
    x = inputs(torch.Generator().manual_seed(7 + num_refs), frames=shape[0], height=shape[1], width=shape[2],
               refs=num_refs, config=den.config)
    with torch.no_grad():
        want = diffusers_velocity(wan, x, x["ref_latents"])
        got = den(**x)
    assert rel_err(got, want) < PARITY_RTOL


@pytest.mark.parametrize("ref_rope", ["shared", "decoupled", "none"])
@pytest.mark.parametrize("num_refs", [1, 2])
@pytest.mark.parametrize("ref_hw", [None, (4, 10)])
def test_reference_kv_cache_equals_recompute(family_dir, ref_rope, num_refs, ref_hw):
    path, _ = family_dir
    den = load_denoiser(path, ref_rope=ref_rope, ref_attention="isolated", ref_timestep="zero")
    gen = torch.Generator().manual_seed(11)
    x = inputs(gen, refs=num_refs, ref_hw=ref_hw, config=den.config)
    latent_fhw = tuple(x["latents"].shape[2:])
    with torch.no_grad():
        cache = den.precompute_reference(x["ref_latents"], x["text"], x["image_context"], latent_fhw)
        for step in range(3):  # the same cache serves every step
            x["latents"] = torch.randn(x["latents"].shape, generator=gen)
            x["timestep"] = torch.rand(2, generator=gen) * 1000
            want = den(**x)
            got = den(**{**x, "ref_latents": None}, ref_cache=cache)
            assert rel_err(got, want) < 1e-5


def test_reference_cache_refuses_configs_that_depend_on_the_video(wan_dir):
    path, _ = wan_dir
    den = load_denoiser(path, ref_attention="full", ref_timestep="zero")
    x = inputs(torch.Generator().manual_seed(3), refs=1)
    with pytest.raises(ValueError, match="ref_attention='isolated'"):
        den.precompute_reference(x["ref_latents"], x["text"], x["image_context"], (3, 6, 8))


@pytest.mark.parametrize("ref_rope", ["shared", "decoupled", "none"])
def test_reference_settings_change_the_output(wan_dir, ref_rope):
    """Decoupled and unrotated references are different models from the frame-append baseline."""
    path, _ = wan_dir
    x = inputs(torch.Generator().manual_seed(5), refs=2)
    with torch.no_grad():
        base = load_denoiser(path, ref_rope="shared")(**x)
        other = load_denoiser(path, ref_rope=ref_rope)(**x)
        zero_t = load_denoiser(path, ref_rope=ref_rope, ref_timestep="zero")(**x)
    assert (rel_err(other, base) > 1e-4) == (ref_rope != "shared")
    assert rel_err(zero_t, other) > 1e-4


def test_view_logit_scales_scale_reference_logits(wan_dir):
    """omega = 1 is the identity; other per-view weights change the output, and only through the refs."""
    path, _ = wan_dir
    x = inputs(torch.Generator().manual_seed(9), refs=3)
    with torch.no_grad():
        plain = load_denoiser(path)(**x)
        ones = load_denoiser(path, view_logit_scales=(1.0, 1.0, 1.0))(**x)
        skewed_den = load_denoiser(path, view_logit_scales=(0.5, 1.0, 2.0))
        skewed = skewed_den(**x)
        skewed_no_refs = skewed_den(**{**x, "ref_latents": None})
        plain_no_refs = load_denoiser(path)(**{**x, "ref_latents": None})
    assert torch.equal(plain, ones)
    assert rel_err(skewed, plain) > 1e-4
    assert torch.equal(skewed_no_refs, plain_no_refs)


@pytest.mark.parametrize("frames", [1, 3, 6])
def test_decoupled_positions_never_collide_and_ignore_video_length(frames):
    video = grid_positions(frames, 6, 8)
    refs = rd_rope_positions("decoupled", 3, (4, 10), (frames, 6, 8), t_stride=2)
    assert refs[:, 0].max() < 0 <= video[:, 0].min()
    assert torch.equal(refs, rd_rope_positions("decoupled", 3, (4, 10), (frames + 5, 6, 8), t_stride=2))
    assert sorted(set(refs[:, 0].tolist())) == [-6, -4, -2]
    # centred on the video grid: a 4x10 reference on a 6x8 video spans h 1..4 and w -1..8
    assert (refs[:, 1].min().item(), refs[:, 1].max().item()) == (1, 4)
    assert (refs[:, 2].min().item(), refs[:, 2].max().item()) == (-1, 8)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 2e-2)])
def test_half_precision_tracks_float32(wan_dir, dtype, tol):
    path, _ = wan_dir
    x = inputs(torch.Generator().manual_seed(13), refs=2)
    with torch.no_grad():
        want = load_denoiser(path)(**x)
        got = load_denoiser(path, dtype=dtype)(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()})
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got, want) < tol
