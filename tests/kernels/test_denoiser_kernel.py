"""The whole denoiser with its joint attention forced through the Triton kernel (interpreter) vs the reference."""
from __future__ import annotations

import importlib

import pytest
import torch

from engine.config import MvgenConfig
from engine.backbones.wan.model import MultiViewWanTransformer
from tests.kernels.conftest import needs_interpreter

pytestmark = needs_interpreter

# head_dim 64 is the smallest the kernel supports; widths stay tiny so the interpreter finishes quickly
SMALL = dict(num_attention_heads=1, attention_head_dim=64, ffn_dim=96, num_layers=2, text_dim=16, freq_dim=32,
             image_dim=16, added_kv_proj_dim=64, max_references=3, view_logit_scales=(0.5, 1.0, 2.0))
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(gen, dtype, refs, frames=2, height=6, width=6, ref_hw=(4, 6)):
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    return dict(latents=r(1, 16, frames, height, width), condition=r(1, 20, frames, height, width),
                timestep=torch.tensor([321.0]), text=r(1, 512, 16), image_context=r(1, 257, 16),
                ref_latents=r(1, refs, 16, *ref_hw))


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("ref_attention,ref_timestep,refs", [("full", "shared", 3), ("isolated", "zero", 1),
                                                             ("full", "shared", 0)])
@pytest.mark.parametrize("ref_rope", ["decoupled", "none"])
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_denoiser_with_kernel_matches_reference_path(gen, monkeypatch, dtype, ref_attention, ref_timestep, refs,
                                                    ref_rope, backend):
    # (``kernels.joint_attention`` is a function of ``kernels``, so import the kernel modules by name)
    attention_module = importlib.import_module("kernels.joint_attention.kernel")
    prologue_module = importlib.import_module("kernels.qk_prologue.kernel")

    launches = []
    for module, name in ((attention_module, "attention_triton"), (prologue_module, "qk_prologue_triton")):
        launch = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=launch, _n=name, **k: launches.append(_n) or _f(*a, **k))
    torch.manual_seed(0)
    cfg = MvgenConfig(**SMALL, ref_attention=ref_attention, ref_timestep=ref_timestep, ref_rope=ref_rope,
                      attention_backend="reference")
    den = MultiViewWanTransformer(cfg).to(dtype).eval().requires_grad_(False)
    den.init_reference_stream_from_base()
    x = _inputs(gen, dtype, refs)
    with torch.no_grad():
        want = den(**x)
        assert not launches
        den.config = cfg.replace(attention_backend=backend)
        got = den(**x)
        if cfg.caches_reference:  # the cached-K/V path goes through the kernel with video-only queries
            cache = den.precompute_reference(x["ref_latents"], x["text"], x["image_context"], (2, 6, 6))
            cached = den(**{**x, "ref_latents": None}, ref_cache=cache)
            assert ((cached.double() - want.double()).norm() / want.double().norm()).item() < TOLERANCE[dtype]
    # every layer's joint attention went through the kernels: the prologue always, the attention kernel on
    # "triton" (on CPU "sdpa" runs the prologue's reference, auto's choice off a GPU, and SDPA's mask-free calls)
    if backend == "triton":
        assert launches.count("attention_triton") >= cfg.num_layers
        assert launches.count("qk_prologue_triton") >= cfg.num_layers
    else:
        assert not launches
    assert torch.isfinite(got).all()
    assert ((got.double() - want.double()).norm() / want.double().norm()).item() < TOLERANCE[dtype]
