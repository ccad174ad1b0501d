"""Wan2.2-T2V-A14B (``tiny-wan22-t2v``: diffusers' ``WanPipeline`` with ``transformer_2``, 16 input channels,
boundary_ratio 0.875): against diffusers end to end with no references, with Stand-In's high/low pair as
``adapter``/``adapter_2`` (a cache per expert, one row each), and exported."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.pipeline import MultiViewPipeline
from engine.tiny import TRANSFORMER_CONFIG, VARIANTS, ensure_tiny, write_stand_in_adapter

SIZE = dict(num_frames=9, height=48, width=80)  # awkward: a 3 x 6 x 10 latent grid


@pytest.fixture(scope="module")
def wan22_t2v(tiny_cache):
    return ensure_tiny(tiny_cache, "tiny-wan22-t2v")


@pytest.fixture(scope="module")
def stand_in_pair(tmp_path_factory):
    """Stand-In's high- and low-noise files for the tiny model, converted (two different draws)."""
    root = tmp_path_factory.mktemp("stand-in-pair")
    config = {**TRANSFORMER_CONFIG, **VARIANTS["tiny-wan22-t2v"].transformer}
    return tuple(write_stand_in_adapter(root / name, config, seed) for name, seed in (("high", 31), ("low", 32)))


def test_checkpoint_is_text_to_video_with_two_experts_at_0_875(wan22_t2v, tiny_cache):
    checkpoint = Checkpoint.load("tiny-wan22-t2v", cache_root=tiny_cache)
    assert [e.folder for e in checkpoint.experts] == ["transformer", "transformer_2"]
    assert checkpoint.config.task == "t2v" and checkpoint.config.in_channels == 16
    assert checkpoint.boundary_ratio == 0.875 and not checkpoint.has_image_encoder
    assert not checkpoint.limits.first_frame
    assert checkpoint.expert_at(torch.tensor(875.0)) == 0 and checkpoint.expert_at(torch.tensor(874.9)) == 1


@pytest.mark.parametrize("scales", [(4.0, 3.0), (5.0, None)])
def test_generation_without_references_equals_diffusers_wan_pipeline(wan22_t2v, scales):
    from diffusers import WanPipeline

    pipe = MultiViewPipeline.from_pretrained(wan22_t2v)
    used = []  # the expert of each step, recorded where the loop calls the stages
    denoise = pipe.stages.denoise
    pipe.stages.denoise = lambda inputs, key, expert, refs: used.append(expert) or denoise(inputs, key, expert, refs)
    ours = pipe(None, [], "a person walks", "blurry", seed=11, steps=6, guidance_scale=scales[0],
                guidance_scale_2=scales[1], **SIZE)

    oracle = WanPipeline.from_pretrained(wan22_t2v)
    oracle.set_progress_bar_config(disable=True)
    calls = []
    for index, model in enumerate((oracle.transformer, oracle.transformer_2)):
        model.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    want = oracle(prompt="a person walks", negative_prompt="blurry", num_inference_steps=6,
                  guidance_scale=scales[0], guidance_scale_2=scales[1], generator=torch.Generator().manual_seed(11),
                  output_type="np", **SIZE).frames[0]
    assert used == calls[::2] == [0, 0, 1, 1, 1, 1]  # diffusers runs cond and uncond as two calls per step
    # measured: 1 uint8 step on 3 (and 2) of 103680 values, float32 rounding at a .5 boundary; 0 elsewhere
    assert np.abs(ours.astype(int) - np.round(want * 255)).max() <= 1


def test_stand_in_high_and_low_files_run_as_the_two_adapters(wan22_t2v, tiny_cache, stand_in_pair):
    high, low = stand_in_pair
    pipe = MultiViewPipeline.from_pretrained("tiny-wan22-t2v", adapter=high, adapter_2=low, cache_root=tiny_cache)
    assert [e.adapter for e in pipe.checkpoint.experts] == [high, low]
    assert all(e.config.shares_reference_rows and e.config.max_references == 1 for e in pipe.checkpoint.experts)
    face = np.random.default_rng(3).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    request = pipe.make_request(references=[face], ref_size=(32, 32), prompt="a person smiles", seed=5,
                                steps=6, guidance_scale_2=3.0, **SIZE)
    stores = [d.caches for d in pipe.stages.denoisers]
    rows = []
    for store in stores:  # the rows of each cache as it is stored
        put = store.put
        store.put = lambda key, cache, put=put: rows.append(cache.rows) or put(key, cache)
    cached = pipe.denoise(pipe.prepare(request))
    assert rows == [1, 1]  # each expert built its own once, one row for both guidance rows
    assert all(len(s) == 0 for s in stores)  # released at the end
    recomputed = pipe.prepare(request)
    recomputed.cache_key, recomputed.cache_references = None, False
    # the cache against the reference stream run live at every step (float32 rounding: measured 1.7e-6 on latents
    # of magnitude 4)
    assert (cached - pipe.denoise(recomputed)).abs().max() < 1e-5
    no_face = pipe.make_request(prompt="a person smiles", seed=5, steps=6, guidance_scale_2=3.0, **SIZE)
    assert (cached - pipe.denoise(pipe.prepare(no_face))).abs().max() > 1e-3  # the faces matter


@pytest.mark.slow
def test_the_low_noise_expert_with_stand_in_exports_and_verifies(wan22_t2v, tiny_cache, stand_in_pair, tmp_path,
                                                                  capsys):
    """``mvgen export onnx`` of Wan2.2-T2V-A14B's second expert with Stand-In's low-noise adapter (the pair given,
    as the experts must agree on max_references): onnxruntime against PyTorch at every verification shape
    (polygraphy, < 1e-4)."""
    from mvgen.cli import main

    out = tmp_path / "onnx"
    code = main(["--cache-dir", str(tiny_cache), "export", "onnx", "--model", "tiny-wan22-t2v", "--expert", "2",
                 "--adapter", str(stand_in_pair[0]), "--adapter-2", str(stand_in_pair[1]), "--out", str(out),
                 "--verify"])
    captured = capsys.readouterr()
    printed = captured.out.splitlines()
    assert code == 0, captured.err[-2000:]
    verified = [line for line in printed if line.startswith("verify ")]
    assert verified and all(line.startswith("verify ok") for line in verified), printed
