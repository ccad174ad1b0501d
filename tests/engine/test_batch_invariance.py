"""``--deterministic`` (``engine.runtime.batch_invariance``): a call's velocity is the same bits alone and in an unpadded
batch with 1 to 7 companions of other seeds, shapes, reference counts, guidance and cache states.

The oracle for the bits is the call run alone through the same ``Denoiser.run`` (no padding anywhere); the
oracle for the values is the model itself on the call's rows, which the deterministic path must match to float
rounding (per-row linears compute the same products as one batched GEMM, in an order that may differ)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.runtime.batch_invariance import BatchInvariantOps, batch_invariant_ops
from engine.checkpoint import Checkpoint
from engine.runtime.denoiser import DenoiseCall, Denoiser

from .conftest import inputs

SHAPES = [dict(frames=2, height=4, width=6), dict(frames=3, height=6, width=10)]  # latent grids (h, w even)


@pytest.fixture(scope="module", params=[{}, dict(ref_attention="isolated", ref_timestep="zero")],
            ids=["full", "isolated-cached"])
def denoiser(tiny_cache, request):
    return Denoiser(Checkpoint.load("tiny", cache_root=tiny_cache, dtype="float32", deterministic=True,
                                    **request.param))


def _call(den: Denoiser, gen: torch.Generator, key: str | None, batch: int, refs: int, shape: dict) -> DenoiseCall:
    cfg = den.model.config
    x = inputs(gen, batch=batch, text_dim=cfg.text_dim, image_dim=cfg.image_dim, refs=refs, **shape)
    x["ref_latents"] = x["ref_latents"] if refs else None
    return DenoiseCall(x, key, cache_references=refs > 0)  # as the loop sends a request without references


@pytest.mark.parametrize("companions", [1, 3, 7])
@pytest.mark.parametrize("batch", [2, 1])  # with and without guidance
def test_a_call_gets_its_bits_alone_and_batched_with_any_others(denoiser, companions, batch):
    gen = torch.Generator().manual_seed(1000 * companions + batch)
    target = _call(denoiser, gen, "target", batch, 2, SHAPES[0])
    others = [_call(denoiser, gen, f"other{i}", (1, 2)[i % 2], (2, 1, 0, 2)[i % 4], SHAPES[i % 3 == 2])
              for i in range(companions)]
    keys = [c.cache_key for c in [target, *others]]
    try:
        alone = denoiser.run([target])[0]
        denoiser.release("target")
        for position in (0, companions // 2 + 1, companions):  # first, middle, last in the batch
            calls = others[:position] + [target] + others[position:]
            results = denoiser.run(calls)
            assert all(isinstance(r, torch.Tensor) for r in results), results
            assert torch.equal(results[position], alone), f"target at {position} of {len(calls)} changed bits"
            for key in keys:  # next round: every call builds its caches again, as at a first step
                denoiser.release(key)
        with torch.no_grad():
            oracle = denoiser.model(**target.inputs)
        torch.testing.assert_close(alone, oracle, rtol=1e-5, atol=1e-5)
    finally:
        for key in keys:
            denoiser.release(key)


def test_later_steps_keep_their_bits_in_a_batch(denoiser):
    """Steps after the first read the request's caches (context K/V, and reference K/V when cached): batched
    next to a companion at its first step, the target's second step is the same bits as alone."""
    gen = torch.Generator().manual_seed(7)
    first = _call(denoiser, gen, "t", 2, 2, SHAPES[0])
    second = DenoiseCall({**first.inputs, "latents": torch.randn(first.inputs["latents"].shape, generator=gen),
                          "ref_latents": None if denoiser.caches_references else first.inputs["ref_latents"]}, "t")
    companion = _call(denoiser, gen, "c", 2, 2, SHAPES[0])
    try:
        denoiser.run([first])
        alone = denoiser.run([second])[0]
        denoiser.release("t")
        denoiser.run([first])
        batched = denoiser.run([companion, second])
        assert torch.equal(batched[1], alone)
    finally:
        denoiser.release("t")
        denoiser.release("c")


@pytest.mark.parametrize("rows,tokens", [(2, 5), (3, 48), (8, 17)])
def test_the_mode_computes_each_row_of_a_linear_and_a_convolution_as_alone(rows, tokens):
    gen = torch.Generator().manual_seed(rows * tokens)
    x = torch.randn(rows, tokens, 96, generator=gen)
    weight, bias = torch.randn(80, 96, generator=gen), torch.randn(80, generator=gen)
    video = torch.randn(rows, 6, 3, 6, 10, generator=gen)
    kernel = torch.randn(12, 6, 1, 2, 2, generator=gen)
    with BatchInvariantOps():
        y = F.linear(x, weight, bias)
        z = F.conv3d(video, kernel, stride=(1, 2, 2))
    for i in range(rows):
        assert torch.equal(y[i:i + 1], F.linear(x[i:i + 1], weight, bias))
        assert torch.equal(z[i:i + 1], F.conv3d(video[i:i + 1], kernel, stride=(1, 2, 2)))
    torch.testing.assert_close(y, x @ weight.T + bias, rtol=1e-5, atol=1e-4)


def test_the_mode_is_off_unless_deterministic():
    assert not isinstance(batch_invariant_ops(False), BatchInvariantOps)
    assert isinstance(batch_invariant_ops(True), BatchInvariantOps)
