"""Phantom-Wan on the embedded ``tiny-phantom`` (its transformer in the original Wan names, three shards with an
index): the loop's three guidance rows and the combined velocity against an independent float64 formulation of
the authors' code (``phantom_reference``), the letterbox-on-white fitting against PIL's padding, and the requests
the recipe refuses."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine import generation
from engine.errors import RequestError
from engine.guidance import RECIPES
from engine.media import letterbox_image
from engine.pipeline import MultiViewPipeline
from engine.tiny import TRANSFORMER_CONFIG, bundled_transformer, ensure_tiny

from . import phantom_reference as oracle
from .conftest import rel_err


@pytest.fixture(scope="module")
def phantom(tiny_cache):
    return MultiViewPipeline.from_pretrained("tiny-phantom", dtype=torch.float32, cache_root=tiny_cache)


def _original_weights(pipe) -> dict[str, torch.Tensor]:
    """The fine-tune's tensors read from its shards by name (not through mvgen's converter), in float64."""
    index = bundled_transformer("tiny-phantom", pipe.checkpoint.path)
    shards = set(json.loads(index.read_text())["weight_map"].values())
    weights = {}
    for shard in sorted(shards):
        weights.update(load_file(index.parent / shard))
    return {k: v.double() for k, v in weights.items()}


def _references(gen: np.random.Generator) -> list[np.ndarray]:
    # a wide and a tall view: both letterboxed onto the 48x80 video with white bands of different sides
    return [gen.integers(0, 256, (30, 97, 3), dtype=np.uint8), gen.integers(0, 256, (71, 23, 3), dtype=np.uint8)]


@pytest.mark.parametrize("step", [0, 2])
def test_three_rows_and_guided_velocity_match_the_authors_formulation(phantom, step):
    gen = np.random.default_rng(27 + step)
    request = phantom.make_request(prompt="a red jacket turns", negative_prompt="blurry, static",
                                   references=_references(gen), num_frames=5, height=48, width=80,
                                   seed=int(gen.integers(1 << 30)))
    assert (request.guidance, request.guidance_scale, request.guidance_scale_image, request.reference_fit) == (
        "phantom", 7.5, 5.0, "letterbox")  # tiny-phantom's defaults: the authors'
    state = phantom.prepare(request)
    for _ in range(step):  # a later step: the loop's own latents and timestep
        generation.step(state, phantom.stages)
    t = state.timesteps[state.step_index]

    rows = torch.full((3, *state.latents.shape[1:]), float("nan"))
    rows.copy_(phantom.stages.denoise(generation.denoiser_inputs(state, t, True), None, 0, False))
    guided = torch.full(state.latents.shape, float("nan"))
    guided.copy_(generation.predict_velocity(state, phantom.stages, t))

    # the oracle's own inputs: the texts encoded on their own, the references fitted by PIL and encoded
    text = phantom.stages.text_encoder([request.prompt, request.negative_prompt])["text"].double()
    views = np.stack([oracle.letterbox(image, 48, 80) for image in request.references])
    refs = phantom.stages.encode_references(views)[0].double()  # [R, 16, h, w]
    want = oracle.phantom_rows(_original_weights(phantom), state.latents[0].double(), refs, float(t), text[0],
                               text[1], TRANSFORMER_CONFIG["num_attention_heads"], TRANSFORMER_CONFIG["freq_dim"])
    errors = {name: rel_err(rows[i], want[name]) for i, name in enumerate(("pos_it", "pos_i", "neg"))}
    errors["guided"] = rel_err(guided[0], oracle.phantom_velocity(want))
    # float32 against float64: measured 2.1e-6 (the guided velocity, step 0; each row at most 7.7e-7)
    assert max(errors.values()) < 1e-5, errors
    assert rel_err(rows[0], rows[1]) > 1e-3 and rel_err(rows[1], rows[2]) > 1e-3  # the rows differ: nothing is shared


@pytest.mark.parametrize("shape", [(30, 97), (71, 23), (48, 80), (50, 83), (1, 1)])
def test_letterbox_matches_the_authors_padding(shape):
    image = np.random.default_rng(shape[0] * 100 + shape[1]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    got = letterbox_image(image, 48, 80)
    np.testing.assert_array_equal(got, oracle.letterbox(image, 48, 80))


def test_recipe_rows_are_declared_once():
    phantom_rows = RECIPES["phantom"].rows
    assert [(r.text, r.references) for r in phantom_rows] == [
        ("prompt", True), ("negative_prompt", True), ("negative_prompt", False)]
    assert len(RECIPES["phantom"].rows_at(1.0)) == 3 and len(RECIPES["cfg"].rows_at(1.0)) == 1


def test_phantom_guidance_needs_references(phantom):
    with pytest.raises(RequestError, match="guidance 'phantom' guides by the references"):
        phantom.make_request(prompt="x")
    with pytest.raises(RequestError, match=r"guidance must be one of \['cfg', 'phantom'\], got 'three'"):
        phantom.make_request(prompt="x", references=[np.zeros((16, 16, 3), np.uint8)], guidance="three")
    with pytest.raises(RequestError, match=r"reference_fit must be one of \['crop', 'letterbox'\]"):
        phantom.make_request(prompt="x", references=[np.zeros((16, 16, 3), np.uint8)], reference_fit="pad")



def test_phantom_rows_on_a_cached_reference_stream_equal_recomputing_it(tiny_cache):
    """The recipe is the loop's, not tiny-phantom's: on a dual-stream model whose reference K/V is cached per request
    (isolated, timestep 0), the cache keeps each row's references (the neg row's zeros too)."""
    rng = np.random.default_rng(31)
    values = dict(prompt="p", negative_prompt="n", references=[rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)] * 2,
                  num_frames=5, height=32, width=32, steps=3, guidance="phantom")
    latents = []
    for cached in (True, False):
        pipe = MultiViewPipeline.from_pretrained("tiny-t2v", cache_root=tiny_cache, reference_cache=cached,
                                                 ref_attention="isolated", ref_timestep="zero")
        state = pipe.prepare(pipe.make_request(**values))
        assert state.cache_references == cached and state.batch == 3
        latents.append(pipe.denoise(state))
    # the cached K/V against recomputing it (tolerance as test_pipeline's cfg check): measured 2.4e-6 apart at most,
    # on latents up to 4.4
    torch.testing.assert_close(latents[0], latents[1], rtol=1e-5, atol=1e-5)


def test_the_downloads_layout_with_the_readme_settings_is_tiny_phantom(phantom, tiny_cache):
    """The README's way to run the real downloads: a Wan2.1-T2V diffusers folder (here tiny-t2v's, whose base
    components are tiny-phantom's), ``--transformer`` at the folder of Phantom's original-name shards, the reference
    layout set with ``--set`` and the recipe in the request, makes tiny-phantom's video bit for bit."""
    rng = np.random.default_rng(41)
    values = dict(prompt="p", negative_prompt="n", references=[rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)],
                  num_frames=5, height=32, width=48, steps=2)
    shards = bundled_transformer("tiny-phantom", phantom.checkpoint.path).parent
    wan_t2v = ensure_tiny(tiny_cache, "tiny-t2v")  # named as a folder: a checkpoint without bundled adapter
    downloads = MultiViewPipeline.from_pretrained(wan_t2v, dtype=torch.float32, transformer_file=shards,
                                                  ref_mode="token_concat", ref_rope="shared", max_references=4)
    readme = downloads(**values, guidance="phantom", guidance_scale=7.5, guidance_scale_image=5.0,
                       reference_fit="letterbox", shift=5.0)
    assert np.array_equal(readme, phantom(**values))
