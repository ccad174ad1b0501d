"""The in-process pipeline on the tiny checkpoint, against diffusers' WanImageToVideoPipeline as the oracle."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.generation import classifier_free_guidance
from engine.pipeline import MultiViewPipeline
from engine.tiny import TINY_VERSION

SIZE = dict(num_frames=9, height=64, width=64, steps=3)


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    return tiny_cache / TINY_VERSION


@pytest.fixture(scope="module")
def pipe(tiny):
    """The tiny pipeline with its bundled reference adapter."""
    return MultiViewPipeline.from_pretrained(tiny, adapter=tiny / "adapter")


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


def _images(rng, count, h=64, w=64):
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(count)]


def test_frames_shape_dtype_and_seed_determinism(pipe, rng):
    frame, *refs = _images(rng, 3)
    a = pipe(frame, refs, "a person walks", seed=1, **SIZE)
    b = pipe(frame, refs, "a person walks", seed=1, **SIZE)
    c = pipe(frame, refs, "a person walks", seed=2, **SIZE)
    assert a.shape == (9, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1


def test_without_references_matches_diffusers_wan_i2v(tiny, rng):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    frame = _images(rng, 1)[0]
    ours = MultiViewPipeline.from_pretrained(tiny)(frame, [], "a  person &amp; a dog", "blurry", seed=3, **SIZE)
    oracle = WanImageToVideoPipeline.from_pretrained(tiny)
    oracle.set_progress_bar_config(disable=True)
    want = oracle(image=Image.fromarray(frame), prompt="a  person &amp; a dog", negative_prompt="blurry", height=64,
                  width=64, num_frames=9, num_inference_steps=3, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(3), output_type="np").frames[0]
    want = np.round(want * 255)
    assert ours.shape == want.shape
    assert np.abs(ours - want).max() <= 1  # uint8 rounding of float32 results within 1e-4


def test_cfg_batched_equals_cond_and_uncond_run_separately(pipe, rng):
    frame, *refs = _images(rng, 3)
    request = pipe.make_request(first_frame=frame, references=refs, prompt="walk", negative_prompt="static",
                                guidance_scale=4.0, seed=5, **SIZE)
    state = pipe.prepare(request)
    assert state.batch == 2
    t = state.timesteps[1]
    batched = pipe.predict_velocity(state, t)
    with torch.no_grad():
        cond, uncond = (
            pipe.denoiser(state.latents, state.condition[i:i + 1], t.expand(1), state.text[i:i + 1],
                          state.image_context[i:i + 1], ref_latents=state.ref_latents[i:i + 1])
            for i in (0, 1)
        )
    torch.testing.assert_close(batched, classifier_free_guidance(torch.cat([cond, uncond]), 4.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, uncond + 4.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_guidance_at_most_one_runs_a_single_batch(pipe, rng):
    frame = _images(rng, 1)[0]
    state = pipe.prepare(pipe.make_request(first_frame=frame, prompt="walk", guidance_scale=1.0, **SIZE))
    assert state.batch == 1 and state.text.shape[0] == 1


def test_reference_cache_equals_recomputing_every_step(tiny, rng):
    frame, *refs = _images(rng, 4)
    pipe = MultiViewPipeline.from_pretrained(tiny, adapter=tiny / "adapter", ref_attention="isolated",
                                             ref_timestep="zero")
    request = pipe.make_request(first_frame=frame, references=refs, prompt="turn", seed=9, **SIZE)
    cached, recomputed = pipe.prepare(request), pipe.prepare(request)
    assert cached.cache_key is not None
    recomputed.cache_key = None  # the references go to the denoiser at every step
    store = pipe.stages.denoisers[0].caches
    held = []
    latents = pipe.denoise(cached, callback=lambda step, total: held.append((len(store), store.nbytes)))
    assert held[0][0] == 1 and held[0][1] > 0 and all(h == held[0] for h in held)  # built once, reused
    assert len(store) == 0  # released when the request ended
    cache = pipe.denoiser.precompute_reference(cached.ref_latents, cached.text, cached.image_context,
                                               tuple(cached.latents.shape[2:]))
    assert len(cache.keys) == pipe.config.num_layers
    torch.testing.assert_close(latents, pipe.denoise(recomputed), rtol=1e-5, atol=1e-5)


def test_references_change_the_video(pipe, rng):
    frame, *refs = _images(rng, 3)
    with_refs, without = (
        pipe.denoise(pipe.prepare(pipe.make_request(first_frame=frame, references=r, prompt="walk", **SIZE)))
        for r in (refs, [])
    )
    assert (with_refs - without).norm() > 1e-2 * without.norm()


def test_references_are_fitted_and_encoded_one_frame_each(pipe, rng):
    refs = _images(rng, 2, 80, 48) + _images(rng, 1, 30, 90)
    latents = pipe.encode_references(refs, 32, 48)
    assert latents.shape == (1, 3, 16, 4, 6)
    assert pipe.encode_references([], 32, 48) is None
    frame = _images(rng, 1)[0]
    state = pipe.prepare(pipe.make_request(first_frame=frame, references=refs, prompt="x", ref_size=(32, 48), **SIZE))
    assert state.ref_latents.shape == (2, 3, 16, 4, 6)


def test_first_frame_condition_and_inpainting_mask(pipe, rng):
    frame = _images(rng, 1)[0]
    plain = pipe.prepare_condition(frame, None, 9, 64, 64)
    assert plain.shape == (1, 20, 3, 8, 8)
    assert (plain[:, :4, 0] == 1).all() and (plain[:, :4, 1:] == 0).all()

    mask = np.zeros((64, 64), bool)
    mask[8:30, 20:44] = True  # latent cells rows 1..3, cols 2..5 touch it
    masked = pipe.prepare_condition(frame, mask, 9, 64, 64)
    known = masked[0, 0, 0]
    expected = torch.ones(8, 8)
    expected[1:4, 2:6] = 0
    assert torch.equal(known, expected) and (masked[:, :4, 0] == known).all()
    grey, _ = pipe.condition_frame(frame, mask, 64, 64)
    assert (grey[mask] == 128).all() and np.array_equal(grey[~mask], frame[~mask])
    assert not torch.allclose(masked[:, 4:, 0], plain[:, 4:, 0])
    assert pipe(frame, [], "x", first_frame_mask=mask, **SIZE).shape == (9, 64, 64, 3)


def test_callback_counts_every_step(pipe, rng):
    frame = _images(rng, 1)[0]
    seen = []
    pipe(frame, [], "x", callback=lambda step, total: seen.append((step, total)), **SIZE)
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_euler_scheduler_and_shift(tiny, rng):
    frame = _images(rng, 1)[0]
    pipe = MultiViewPipeline.from_pretrained(tiny, scheduler="euler")
    state = pipe.prepare(pipe.make_request(first_frame=frame, prompt="x", shift=5.0, **SIZE))
    assert type(state.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe(frame, [], "x", shift=5.0, **SIZE).shape == (9, 64, 64, 3)


def test_defaults_come_from_the_checkpoint(pipe, rng):
    assert pipe.defaults["num_frames"] == 9 and pipe.defaults["shift"] == 3.0
    assert pipe.limits.max_references == 3
    frame = _images(rng, 1)[0]
    assert pipe(frame, [], "x", steps=1).shape == (9, 64, 64, 3)


def test_bfloat16_denoiser_runs(tiny, rng):
    frame, ref = _images(rng, 2)
    pipe = MultiViewPipeline.from_pretrained(tiny, adapter=tiny / "adapter", dtype=torch.bfloat16)
    frames = pipe(frame, [ref], "x", **SIZE)
    assert frames.shape == (9, 64, 64, 3) and frames.dtype == np.uint8
