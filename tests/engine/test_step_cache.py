"""Step caching (``engine.runtime.step_cache``, TeaCache's rule): decisions from the relative L1 change of the first
block's modulated input, accumulated over skipped steps, and a skipped step equal to the head applied to the
current input plus the last computed residual."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.config import MvgenConfig
from engine.backbones.wan.model import MultiViewWanTransformer
from engine.runtime.step_cache import StepCache

from .conftest import SMALL_WAN, inputs, rel_err

TIMESTEPS = (999.0, 960.0, 955.0, 950.0, 700.0, 300.0)


def _model() -> MultiViewWanTransformer:
    torch.manual_seed(4)
    model = MultiViewWanTransformer(MvgenConfig.from_dict(SMALL_WAN)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _steps(gen):
    """A request's calls: the latents drift a little per step, the timestep falls."""
    x = inputs(gen, frames=2, height=6, width=10, refs=2)
    out = []
    for t in TIMESTEPS:
        x = dict(x, latents=x["latents"] + 0.05 * torch.randn(x["latents"].shape, generator=gen),
                 timestep=torch.full((2,), t))
        out.append(x)
    return out


def _oracle_distances(model, calls):
    """Relative L1 change of AdaLN(x; t) of block 0 between consecutive calls, in float64, from the equation
    (LayerNorm without affine, then (1 + scale) and shift of block 0's modulation)."""
    block, feats = model.blocks[0], []
    for x in calls:
        video = torch.cat([x["latents"], x["condition"]], 1)
        tokens = model.patch_embedding(video).flatten(2).transpose(1, 2).double()
        _, tproj = model.condition_embedder.time(x["timestep"], torch.float32)
        shift, scale, *_ = (block.scale_shift_table + tproj.float()).double().chunk(6, dim=1)
        feats.append(F.layer_norm(tokens, tokens.shape[-1:], eps=block.norm1.eps) * (1 + scale) + shift)
    return [((b - a).abs().sum() / a.abs().sum()).item() for a, b in zip(feats, feats[1:])]


def test_tiny_threshold_never_skips_and_equals_no_cache():
    model = _model()
    calls = _steps(torch.Generator().manual_seed(1))
    cache = StepCache(threshold=1e-12)
    with torch.no_grad():
        for x in calls:
            assert torch.equal(model(**x, step_cache=cache), model(**x))
    assert cache.skipped == 0 and cache.computed == len(calls)


@pytest.mark.parametrize("threshold", [0.1, 0.15, 0.25])
def test_decisions_follow_the_accumulated_distance_and_skips_reuse_the_residual(threshold, monkeypatch):
    model = _model()
    calls = _steps(torch.Generator().manual_seed(2))
    distances = _oracle_distances(model, calls)
    expected, accumulated = ["compute"], 0.0
    for d in distances:
        accumulated += d
        if accumulated < threshold:
            expected.append("skip")
        else:
            expected.append("compute")
            accumulated = 0.0
    assert "skip" in expected and expected.count("compute") > 1, (threshold, distances)  # the case tests both

    recorded = {}
    original = MultiViewWanTransformer._blocks

    def recording(self, x, *args):  # the block stack as the model runs it, its residual kept
        out = original(self, x, *args)
        recorded["residual"] = out - x
        return out

    def replaced(self, x, *args):  # the oracle of a skipped step: the stack replaced by the last residual
        return x + recorded["residual"]

    cache = StepCache(threshold=threshold)
    with torch.no_grad():
        for x, decision in zip(calls, expected):
            monkeypatch.setattr(MultiViewWanTransformer, "_blocks", recording)
            skipped_before = cache.skipped
            got = model(**x, step_cache=cache)
            assert (cache.skipped > skipped_before) == (decision == "skip")
            if decision == "skip":
                monkeypatch.setattr(MultiViewWanTransformer, "_blocks", replaced)
                assert torch.equal(got, model(**x))
            else:
                monkeypatch.setattr(MultiViewWanTransformer, "_blocks", original)
                assert rel_err(got, model(**x)) == 0.0
    assert cache.skipped == expected.count("skip")


@pytest.mark.parametrize("threshold", [0, -1.0])
def test_threshold_must_be_positive(threshold):
    with pytest.raises(ValueError, match="threshold must be > 0"):
        StepCache(threshold)


@pytest.mark.parametrize("argv, want", [
    ([], None), (["--step-cache"], 0.1), (["--step-cache", "0.25"], 0.25),
    (["--step-cache", "--set", "step_cache_threshold=0.05"], 0.05),
])
def test_step_cache_flag_sets_the_threshold(argv, want):
    from engine.cli_args import parse_overrides, step_cache_overrides
    from mvgen.cli import build_parser

    args = build_parser({}).parse_args(["generate", "--prompt", "x", "--out", "v.mp4", *argv])
    overrides = step_cache_overrides(args, parse_overrides(args.overrides))
    assert overrides.get("step_cache_threshold") == want


def test_step_cache_flag_refuses_a_non_positive_threshold(capsys):
    from mvgen.cli import main

    assert main(["generate", "--model", "tiny", "--prompt", "x", "--step-cache", "0", "--out", "v.mp4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvgen: error: ") and "--step-cache THRESHOLD must be > 0" in err
