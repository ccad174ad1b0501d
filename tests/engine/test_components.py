"""``engine.checkpoint.Denoiser.run``: calls of equal shapes share a batch, yet each call's answer is its own.

Two oracles: the model itself on one call's rows (``MultiViewWanTransformer.forward``, references
recomputed), which every answer must match to float rounding; and the same call run in a batch of its own at
the same padding, whose bits a call must get whoever shares its batch (a failing companion, a cache miss,
other requests). Without padding (``pad_to=0``) the GEMMs see other row counts, so only rounding is promised.
"""
from __future__ import annotations

import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.runtime.denoiser import DenoiseCall, Denoiser
from engine.errors import ReferenceCacheMiss

from .conftest import inputs

LATENT = dict(frames=2, height=4, width=6)  # latent grid of every call here (the 1x2x2 patch needs even h, w)
CACHED = dict(ref_attention="isolated", ref_timestep="zero")  # the tiny model's reference stream made cacheable


@pytest.fixture(scope="module")
def denoiser(tiny_cache):
    """The tiny model as shipped (full reference attention: nothing is cached)."""
    return Denoiser(Checkpoint.load("tiny", cache_root=tiny_cache))


@pytest.fixture(scope="module")
def cached_denoiser(tiny_cache):
    """The tiny model with a cacheable reference stream."""
    return Denoiser(Checkpoint.load("tiny", cache_root=tiny_cache, **CACHED))


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(hash(request.node.name) % 2**31)


def _call_inputs(denoiser: Denoiser, gen: torch.Generator, batch: int = 2, refs: int = 0) -> dict:
    cfg = denoiser.model.config
    x = inputs(gen, batch=batch, text_dim=cfg.text_dim, image_dim=cfg.image_dim, refs=refs, **LATENT)
    x["ref_latents"] = x["ref_latents"] if refs else None
    return x


def _alone(denoiser: Denoiser, x: dict) -> torch.Tensor:
    """The oracle: the model itself on this call's rows only, references recomputed."""
    with torch.no_grad():
        return denoiser.model(**x)


def _run_alone(denoiser: Denoiser, x: dict, pad_to: int, key: str | None = None) -> torch.Tensor:
    """The call in a batch of its own at the same padding: the bits it must get whatever its companions."""
    return denoiser.run([DenoiseCall(x, key)], pad_to)[0]


def _break_timestep(x: dict) -> dict:
    """One timestep too many: the batch's signature (every shape[1:]) is unchanged, so the call groups with
    the others, but the model fails on it (its timestep rows do not match its latent rows)."""
    return {**x, "timestep": torch.cat([x["timestep"], x["timestep"][:1]])}


@pytest.mark.parametrize("pad_to", [0, 8])
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_a_failing_call_fails_alone_and_its_companions_are_answered(denoiser, gen, bad, pad_to):
    calls = [_call_inputs(denoiser, gen) for _ in range(3)]
    calls[bad] = _break_timestep(calls[bad])
    with pytest.raises(RuntimeError):  # the broken call does fail inside the model, not before
        _alone(denoiser, calls[bad])
    results = denoiser.run([DenoiseCall(x) for x in calls], pad_to)
    assert len(results) == 3
    for i, (x, result) in enumerate(zip(calls, results)):
        if i == bad:
            assert isinstance(result, RuntimeError), f"call {i}: {result!r}"
            continue
        assert isinstance(result, torch.Tensor), f"call {i}: {result!r}"
        assert torch.equal(result, _run_alone(denoiser, x, pad_to)), f"call {i} changed next to a failing call"
        torch.testing.assert_close(result, _alone(denoiser, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [(2, 2, 2), (1, 2, 1), (2, 2, 2, 2)])  # with and without guidance; a full batch
def test_padded_batches_give_each_call_its_bits_alone(denoiser, gen, rows):
    """Padded to the server's 8 rows, a call's velocity is the same bits whoever shares its batch."""
    calls = [_call_inputs(denoiser, gen, batch=b, refs=2) for b in rows]
    results = denoiser.run([DenoiseCall(x) for x in calls], pad_to=8)
    for x, result in zip(calls, results):
        assert torch.equal(result, _run_alone(denoiser, x, 8))
        torch.testing.assert_close(result, _alone(denoiser, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("latent", [LATENT, dict(frames=3, height=6, width=10)])
@pytest.mark.parametrize("refs", [0, 2])
@pytest.mark.parametrize("batch", [1, 2])  # without and with guidance
def test_a_call_gets_the_same_bits_at_its_own_rows_and_in_the_servers_padded_batch(denoiser, gen, batch, refs,
                                                                                   latent):
    """Batch invariance: the in-process pipeline runs a request at its own 1 or 2 rows, the server pads every
    batch to 8 and mixes requests; the video must not change by a bit (small-M GEMMs and the patch convolution
    run on fixed row blocks, see ``engine.runtime.batch_invariance.batch_invariant``)."""
    cfg = denoiser.model.config
    x = inputs(gen, batch=batch, text_dim=cfg.text_dim, image_dim=cfg.image_dim, refs=refs, **latent)
    other = inputs(gen, batch=2, text_dim=cfg.text_dim, image_dim=cfg.image_dim, refs=refs, **latent)
    alone = _alone(denoiser, x)
    assert torch.equal(alone, _run_alone(denoiser, x, 8))
    assert torch.equal(alone, denoiser.run([DenoiseCall(other), DenoiseCall(x)], pad_to=0)[1])


def test_a_cache_miss_fails_that_call_only(cached_denoiser, gen):
    den = cached_denoiser
    built = _call_inputs(den, gen, refs=2)  # a request's first step: builds its cache
    missing = _call_inputs(den, gen)  # a key never built, and no references to build it from
    plain = _call_inputs(den, gen)  # no references, no key
    builds = den.caches.builds
    results = den.run([DenoiseCall(built, "built"), DenoiseCall(missing, "never-built"), DenoiseCall(plain)], 8)
    try:
        assert isinstance(results[1], ReferenceCacheMiss) and "never-built" in str(results[1])
        assert "never-built" not in den.caches and "built" in den.caches and den.caches.builds - builds == 1
        torch.testing.assert_close(results[0], _alone(den, built), rtol=1e-5, atol=1e-5)
        assert torch.equal(results[2], _run_alone(den, plain, 8))
    finally:
        den.release("built")


@pytest.mark.parametrize("pad_to", [0, 8])
def test_cached_requests_batched_together_equal_recomputing_their_references(cached_denoiser, gen, pad_to):
    """Two requests' caches stacked in one batch (``ReferenceCache.cat``), over three steps: the first step
    builds them, later steps send no references; each matches the model recomputing its references alone."""
    den = cached_denoiser
    requests = {key: _call_inputs(den, gen, refs=refs) for key, refs in (("a", 1), ("b", 1))}
    builds = den.caches.builds
    try:
        for step in range(3):
            for x in requests.values():
                x["latents"] = torch.randn(x["latents"].shape, generator=gen)
                x["timestep"] = torch.rand(2, generator=gen) * 1000
            sent = {key: x if step == 0 else {**x, "ref_latents": None} for key, x in requests.items()}
            batched = den.run([DenoiseCall(x, key) for key, x in sent.items()], pad_to)
            assert den.caches.builds - builds == 2 and len(den.caches) == 2  # built at the first step, reused after
            for (key, x), velocity in zip(requests.items(), batched):
                if pad_to:
                    alone = _run_alone(den, sent[key], pad_to, key)
                    assert torch.equal(velocity, alone), f"{key}: batched differs from alone, step {step}"
                torch.testing.assert_close(velocity, _alone(den, x), rtol=1e-5, atol=1e-5)
    finally:
        for key in requests:
            den.release(key)
