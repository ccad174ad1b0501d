"""The Wan family beyond Wan2.1-I2V: Wan2.1-T2V (reference-to-video, no first frame) and Wan2.2-I2V-A14B's two
experts, on the embedded ``tiny-t2v`` and ``tiny-wan22``, against diffusers' pipelines and transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.errors import CheckpointError, RequestError
from engine.backbones.registry import load_denoiser
from engine.pipeline import MultiViewPipeline
from engine.tiny import ensure_tiny

from .conftest import PARITY_RTOL

SIZE = dict(num_frames=9, height=64, width=64)


@pytest.fixture(scope="module")
def t2v(tiny_cache):
    return ensure_tiny(tiny_cache, "tiny-t2v")


@pytest.fixture(scope="module")
def wan22(tiny_cache):
    return ensure_tiny(tiny_cache, "tiny-wan22")


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


def _images(rng, count, h=64, w=64):
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(count)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- Wan2.1-T2V ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fhw", [(3, 6, 10), (2, 14, 4)])  # held-out shapes: not the tiny defaults
def test_t2v_denoiser_without_references_equals_diffusers(t2v, fhw):
    from diffusers import WanTransformer3DModel

    oracle = WanTransformer3DModel.from_pretrained(t2v / "transformer").eval()
    ours = load_denoiser(t2v)
    assert ours.config.task == "t2v" and ours.condition_embedder.image_embedder is None
    g = torch.Generator().manual_seed(sum(fhw))
    latents = torch.randn(2, 16, *fhw, generator=g)
    text = torch.randn(2, 512, 32, generator=g)
    timestep = torch.tensor([999.0, 412.5])
    with torch.no_grad():
        want = oracle(latents, timestep, text, return_dict=False)[0]
        got = ours(latents, None, timestep, text, None)
    assert _rel(got, want) < PARITY_RTOL


def test_t2v_generation_without_references_equals_diffusers_wan_pipeline(t2v):
    from diffusers import WanPipeline

    ours = MultiViewPipeline.from_pretrained(t2v)(None, [], "a person turns", "blurry", seed=5, steps=3, **SIZE)
    oracle = WanPipeline.from_pretrained(t2v)
    oracle.set_progress_bar_config(disable=True)
    want = oracle(prompt="a person turns", negative_prompt="blurry", height=64, width=64, num_frames=9,
                  num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(5),
                  output_type="np").frames[0]
    assert ours.shape == want.shape
    assert np.abs(ours.astype(int) - np.round(want * 255)).max() <= 1


@pytest.fixture(scope="module")
def t2v_pipe(t2v):
    return MultiViewPipeline.from_pretrained(t2v, ref_attention="isolated", ref_timestep="zero")


def test_reference_to_video_runs_and_the_references_matter(t2v_pipe, rng):
    refs = _images(rng, 3)
    video = t2v_pipe(None, refs, "the person from the references walks", seed=2, steps=2, **SIZE)
    assert video.shape == (9, 64, 64, 3) and video.dtype == np.uint8
    latents = [t2v_pipe.denoise(t2v_pipe.prepare(t2v_pipe.make_request(references=views, prompt="walk", seed=2,
                                                                        steps=2, **SIZE)))
               for views in (refs, [])]
    assert _rel(*latents) > 1e-2  # the references reach the video (the tiny VAE's decoder flattens the difference)


def test_reference_to_video_cache_equals_recomputation(t2v_pipe, rng):
    request = t2v_pipe.make_request(references=_images(rng, 2), prompt="turn around", seed=4, steps=3, **SIZE)
    cached, recomputed = t2v_pipe.prepare(request), t2v_pipe.prepare(request)
    assert cached.cache_key is not None and cached.condition is None and cached.image_context is None
    recomputed.cache_key = None
    builds = t2v_pipe.stages.denoisers[0].caches.builds
    latents = t2v_pipe.denoise(cached)
    assert t2v_pipe.stages.denoisers[0].caches.builds == builds + 1
    torch.testing.assert_close(latents, t2v_pipe.denoise(recomputed), rtol=1e-5, atol=1e-5)


def test_the_first_frame_follows_the_task(t2v_pipe, tiny_cache, rng):
    frame = _images(rng, 1)[0]
    with pytest.raises(RequestError, match="takes no first_frame"):
        t2v_pipe.make_request(first_frame=frame, prompt="x")
    i2v = Checkpoint.load("tiny", cache_root=tiny_cache)
    from engine.request import make_request

    with pytest.raises(RequestError, match="first_frame is required"):
        make_request(i2v.defaults, i2v.limits, prompt="x", references=[frame])
    with pytest.raises(RequestError, match="guidance_scale_2 applies to two-expert models"):
        make_request(i2v.defaults, i2v.limits, prompt="x", first_frame=frame, guidance_scale_2=2.0)


# ---- Wan2.2-I2V-A14B ----------------------------------------------------------------------------------------
def test_wan22_checkpoint_has_two_experts_switched_at_the_boundary(wan22, tiny_cache):
    checkpoint = Checkpoint.load("tiny-wan22", cache_root=tiny_cache)
    assert [e.folder for e in checkpoint.experts] == ["transformer", "transformer_2"]
    assert checkpoint.boundary_ratio == 0.9 and not checkpoint.has_image_encoder
    assert [e.adapter for e in checkpoint.experts] == [wan22 / "adapter", wan22 / "adapter_2"]
    assert checkpoint.expert_at(torch.tensor(900.0)) == 0 and checkpoint.expert_at(torch.tensor(899.9)) == 1


@pytest.mark.parametrize("scales", [(5.0, None), (4.0, 2.5)])
def test_wan22_generation_equals_diffusers_with_the_expert_switch(wan22, rng, scales):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    frame = _images(rng, 1)[0]
    pipe = MultiViewPipeline.from_pretrained(wan22)
    used = []  # the expert of each step, recorded where the loop calls the stages
    denoise = pipe.stages.denoise
    pipe.stages.denoise = lambda inputs, key, expert, refs: used.append(expert) or denoise(inputs, key, expert, refs)
    ours = pipe(frame, [], "a person turns", "blurry", seed=7, steps=6, guidance_scale=scales[0],
                guidance_scale_2=scales[1], **SIZE)

    oracle = WanImageToVideoPipeline.from_pretrained(wan22)
    oracle.set_progress_bar_config(disable=True)
    calls = []
    for index, model in enumerate((oracle.transformer, oracle.transformer_2)):
        model.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    want = oracle(image=Image.fromarray(frame), prompt="a person turns", negative_prompt="blurry", height=64,
                  width=64, num_frames=9, num_inference_steps=6, guidance_scale=scales[0],
                  guidance_scale_2=scales[1], generator=torch.Generator().manual_seed(7), output_type="np").frames[0]
    assert used == calls[::2] == [0, 0, 1, 1, 1, 1]  # diffusers runs cond and uncond as two calls per step
    assert np.abs(ours.astype(int) - np.round(want * 255)).max() <= 1


def test_wan22_reference_caches_per_expert_equal_recomputation(wan22, rng):
    pipe = MultiViewPipeline.from_pretrained(wan22, ref_attention="isolated", ref_timestep="zero")
    frame, *refs = _images(rng, 3)
    request = pipe.make_request(first_frame=frame, references=refs, prompt="walk", seed=3, steps=6,
                                guidance_scale_2=3.0, **SIZE)
    cached, recomputed = pipe.prepare(request), pipe.prepare(request)
    recomputed.cache_key = None
    stores = [d.caches for d in pipe.stages.denoisers]
    builds = [s.builds for s in stores]
    latents = pipe.denoise(cached)
    assert [s.builds - b for s, b in zip(stores, builds)] == [1, 1]  # each expert built its own, once
    assert all(len(s) == 0 for s in stores)  # both released at the end
    assert (latents - pipe.denoise(recomputed)).abs().max() < 1e-5


def test_wan22_experts_are_different_models(wan22):
    first, second = load_denoiser(wan22), load_denoiser(wan22, folder="transformer_2")
    assert not torch.equal(first.blocks[0].attn1.to_q.weight, second.blocks[0].attn1.to_q.weight)


# ---- what is not served -------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels, words", [
    ((48, 16), "Wan2.2-TI2V-5B"),
    ((20, 16), "supported: Wan2.1-T2V"),
])
def test_unsupported_families_are_refused_naming_what_is_supported(tmp_path, channels, words):
    transformer = tmp_path / "transformer"
    transformer.mkdir()
    config = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=24, in_channels=channels[0],
                  out_channels=channels[1], text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, image_dim=None)
    (transformer / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=words) as caught:
        Checkpoint.load(tmp_path)
    assert "in_channels 16" in str(caught.value) and "in_channels 36" in str(caught.value)


def test_two_experts_need_a_boundary(wan22, tmp_path):
    import shutil

    copy = tmp_path / "w"
    shutil.copytree(wan22, copy)
    index = json.loads((copy / "model_index.json").read_text())
    del index["boundary_ratio"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no boundary_ratio"):
        Checkpoint.load(copy)
