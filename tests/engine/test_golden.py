"""Golden velocities over the matrix of families x modes x references (sequence parallel: ``test_parallel``).

Each case loads an embedded tiny checkpoint through ``load_denoiser`` (the loader, the adapter reader, the shared
reference weights, every mode's tensors), draws seeded inputs and records the denoiser's output (several steps
where a cache carries state between them) in ``tests/goldens/``; after a code move the bits must not change
(``tests.goldens``: bit equality on the recording machine, float32 rounding elsewhere).
"""
from __future__ import annotations

import pytest
import torch

from engine.backbones.registry import load_denoiser
from engine.runtime.step_cache import StepCache
from engine.tiny import ensure_tiny
from tests.goldens import check_golden

pytestmark = pytest.mark.golden

FRAMES, HEIGHT, WIDTH = 3, 6, 8  # 3 x 3 x 4 = 36 video tokens
REF_HW = (4, 6)  # 2 x 3 = 6 tokens per reference
BATCH = 2
_ISOLATED_CACHED = dict(ref_attention="isolated", ref_timestep="zero")
# name: (tiny variant, transformer folder, adapter folder, config overrides, references, what runs)
# "what runs": "forward" (one call), "ref_cache" (precompute_reference, then a call on the cache),
# "context_cache" (precompute_context, then a call on it), "steps" (four calls with a step cache)
CASES = {
    "i2v_r0": ("tiny", "transformer", "adapter", {}, 0, "forward"),
    "i2v_full": ("tiny", "transformer", "adapter", {}, 2, "forward"),
    "i2v_full_context_cache": ("tiny", "transformer", "adapter", {}, 2, "context_cache"),
    "i2v_isolated": ("tiny", "transformer", "adapter", dict(ref_attention="isolated"), 3, "forward"),
    "i2v_isolated_cached": ("tiny", "transformer", "adapter", _ISOLATED_CACHED, 2, "ref_cache"),
    "i2v_shared_rope": ("tiny", "transformer", "adapter", dict(ref_rope="shared"), 2, "forward"),
    "i2v_no_rope_zero_t": ("tiny", "transformer", "adapter", dict(ref_rope="none", ref_timestep="zero"), 1,
                           "forward"),
    "i2v_merged": ("tiny", "transformer", "adapter", dict(ref_weights="merged"), 2, "forward"),
    "i2v_token_concat": ("tiny", "transformer", None, dict(ref_mode="token_concat"), 2, "forward"),
    "i2v_prototype": ("tiny", "transformer", "adapter_prototype", {}, 3, "forward"),
    "i2v_prototype_r0": ("tiny", "transformer", "adapter_prototype", {}, 0, "forward"),
    "i2v_prototype_cached": ("tiny", "transformer", "adapter_prototype", dict(ref_timestep="zero"), 2, "ref_cache"),
    "i2v_multiview": ("tiny", "transformer", "adapter_multiview", {}, 3, "forward"),
    "i2v_multiview_cached": ("tiny", "transformer", "adapter_multiview", _ISOLATED_CACHED, 2, "ref_cache"),
    "i2v_identity": ("tiny", "transformer", "adapter_identity", {}, 2, "forward"),
    "i2v_identity_context_cache": ("tiny", "transformer", "adapter_identity", {}, 2, "context_cache"),
    "i2v_all": ("tiny", "transformer", "adapter_all", {}, 2, "forward"),
    "i2v_step_cache": ("tiny", "transformer", "adapter", dict(step_cache_threshold=0.05), 2, "steps"),
    "t2v_r0": ("tiny-t2v", "transformer", "adapter", {}, 0, "forward"),
    "t2v_full": ("tiny-t2v", "transformer", "adapter", {}, 3, "forward"),
    "t2v_isolated_cached": ("tiny-t2v", "transformer", "adapter", _ISOLATED_CACHED, 2, "ref_cache"),
    "t2v_prototype": ("tiny-t2v", "transformer", "adapter_prototype", {}, 2, "forward"),
    "wan22_high_full": ("tiny-wan22", "transformer", "adapter", {}, 2, "forward"),
    "wan22_low_full": ("tiny-wan22", "transformer_2", "adapter_2", {}, 2, "forward"),
    "wan22_low_cached": ("tiny-wan22", "transformer_2", "adapter_2", _ISOLATED_CACHED, 1, "ref_cache"),
    "mmdit_r0": ("tiny-mmdit", "transformer", "adapter", {}, 0, "forward"),
    "mmdit_full": ("tiny-mmdit", "transformer", "adapter", {}, 2, "forward"),
    "mmdit_isolated": ("tiny-mmdit", "transformer", "adapter", dict(ref_attention="isolated"), 2, "forward"),
    "mmdit_shared_rope": ("tiny-mmdit", "transformer", "adapter", dict(ref_rope="shared"), 1, "forward"),
    "mmdit_isolated_cached": ("tiny-mmdit", "transformer", "adapter", _ISOLATED_CACHED, 2, "ref_cache"),
    # the reference stream as a merged copy (the MMDiT's only layout before it shared the video stream's weights)
    "mmdit_full+merged": ("tiny-mmdit", "transformer", "adapter", dict(ref_weights="merged"), 2, "forward"),
    "mmdit_isolated+merged": ("tiny-mmdit", "transformer", "adapter", dict(ref_attention="isolated",
                                                                           ref_weights="merged"), 2, "forward"),
    "mmdit_shared_rope+merged": ("tiny-mmdit", "transformer", "adapter", dict(ref_rope="shared", ref_weights="merged"),
                                 1, "forward"),
    "mmdit_isolated_cached+merged": ("tiny-mmdit", "transformer", "adapter",
                                     dict(_ISOLATED_CACHED, ref_weights="merged"), 2, "ref_cache"),
}
STEP_TIMESTEPS = (990.0, 985.0, 980.0, 600.0)


@pytest.fixture(scope="module")
def golden_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("golden-cache")


def case_inputs(name: str, cfg) -> dict:
    gen = torch.Generator().manual_seed(sum(map(ord, name.removesuffix("+merged"))))  # a layout's twin: same inputs
    refs = CASES[name][4]

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    x = dict(latents=r(BATCH, 16, FRAMES, HEIGHT, WIDTH),
             condition=r(BATCH, cfg.condition_channels, FRAMES, HEIGHT, WIDTH) if cfg.condition_channels else None,
             timestep=torch.tensor([937.0, 211.0]), text=r(BATCH, cfg.text_len, cfg.text_dim),
             ref_latents=r(BATCH, refs, 16, *REF_HW))
    if cfg.family == "mmdit":
        x["text_mask"] = torch.zeros(BATCH, cfg.text_len)
        x["text_mask"][0, :7], x["text_mask"][1, :] = 1, 1  # a short prompt (padding masked) and a full one
        x["pooled_text"] = r(BATCH, cfg.pooled_projection_dim)
        return x
    x["image_context"] = r(BATCH, 257, cfg.image_dim) if cfg.image_dim is not None else None
    if cfg.ref_attention == "prototype":
        x["frame_pose"] = torch.rand(BATCH, FRAMES, cfg.pose_channels, HEIGHT, WIDTH, generator=gen) * 2 - 1
        x["ref_pose"] = torch.rand(BATCH, refs, cfg.pose_channels, *REF_HW, generator=gen) * 2 - 1
    if cfg.identity:
        x["identity_context"] = r(BATCH, 257, cfg.image_dim)
    if cfg.view_attention == "multiview" and refs:
        x["view_omega"] = torch.rand(BATCH, refs, generator=gen)
    return x


@torch.no_grad()
def run_case(model, name: str, x: dict) -> dict[str, torch.Tensor]:
    runs = CASES[name][5]
    if runs == "ref_cache":
        text_extras = {k: x[k] for k in ("text_mask", "pooled_text") if k in x}
        cache = model.precompute_reference(x["ref_latents"], x["text"], x.get("image_context"),
                                           (FRAMES, HEIGHT, WIDTH), **text_extras)
        out = {f"ref_k{i}": k for i, k in enumerate(cache.keys)}
        out["velocity"] = model(**{**x, "ref_latents": None}, ref_cache=cache)
        return out
    if runs == "context_cache":
        cache = model.precompute_context(x["text"], x.get("image_context"), x.get("identity_context"))
        return {"velocity": model(**x, context_cache=cache)}
    if runs == "steps":
        cache, out = StepCache(model.config.step_cache_threshold), {}
        for i, t in enumerate(STEP_TIMESTEPS):
            call = dict(x, latents=x["latents"] * (1 + 0.01 * i), timestep=torch.full_like(x["timestep"], t))
            out[f"velocity{i}"] = model(**call, step_cache=cache)
        out["skipped"] = torch.tensor([cache.skipped])
        assert 0 < cache.skipped < len(STEP_TIMESTEPS) - 1, "the step cache case must skip some steps, not all"
        return out
    return {"velocity": model(**x)}


@pytest.mark.parametrize("name", list(CASES))
def test_golden_velocity(golden_cache, name):
    variant, folder, adapter, overrides, _, _ = CASES[name]
    root = ensure_tiny(golden_cache, variant)
    model = load_denoiser(root, None if adapter is None else root / adapter, folder=folder, **overrides).eval()
    x = case_inputs(name, model.config)
    out = run_case(model, name, x)
    assert all(torch.isfinite(t).all() for t in out.values())
    check_golden(f"denoiser_{name}", out)


# whole generations on each family's tiny pipeline: final frames, so the encoders, the VAE layout, the scheduler
# and the loop are guarded too (``first frame``: whether the family takes one)
PIPELINES = {"tiny": True, "tiny-t2v": False, "tiny-wan22": True, "tiny-mmdit": True}


@pytest.mark.parametrize("variant", list(PIPELINES))
def test_golden_generation(golden_cache, variant):
    import numpy as np

    from engine.pipeline import MultiViewPipeline

    root = ensure_tiny(golden_cache, variant)
    pipe = MultiViewPipeline.from_pretrained(root, adapter=root / "adapter", cache_root=golden_cache)
    rng = np.random.default_rng(sum(map(ord, variant)))
    frame, *refs = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3))
    frames = pipe(frame if PIPELINES[variant] else None, refs, "a person turns around", "blurry", seed=5,
                  num_frames=5, height=48, width=64)  # the variant's steps: both of Wan2.2's experts run
    check_golden(f"generation_{variant}", {"frames": torch.from_numpy(frames)})
