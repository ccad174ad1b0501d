"""Per-step saving of reusing the reference stream's K/V (``isolated`` + ``zero``) against recomputing it.

    python -m benchmarks.reference_cache [--out out/benchmarks] [--repeats 5]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from engine.config import MvgenConfig
from engine.backbones.wan.model import MultiViewWanTransformer

from .common import median, time_call, write_results

# latent shapes: (frames, height, width) of the video and (height, width) of each reference
CASES = {
    "tiny": dict(model=dict(num_attention_heads=2, attention_head_dim=24, ffn_dim=64, num_layers=2, text_dim=32,
                            freq_dim=32, image_dim=32, added_kv_proj_dim=48),
                 video=(3, 8, 8), refs=(3, 8, 8)),
    "cpu-medium": dict(model=dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=1536, num_layers=4,
                                  text_dim=256, freq_dim=256, image_dim=256, added_kv_proj_dim=512),
                       video=(5, 24, 32), refs=(3, 24, 32)),
}


def measure(name: str, case: dict, repeats: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    cfg = MvgenConfig(**case["model"], ref_attention="isolated", ref_timestep="zero", ref_rope="decoupled")
    den = MultiViewWanTransformer(cfg).eval().requires_grad_(False)
    f, h, w = case["video"]
    r, hr, wr = case["refs"]
    b = 2  # conditional + unconditional, as the pipeline batches them
    x = dict(latents=torch.randn(b, 16, f, h, w), condition=torch.randn(b, 20, f, h, w),
             timestep=torch.full((b,), 500.0), text=torch.randn(b, 512, cfg.text_dim),
             image_context=torch.randn(b, 257, cfg.image_dim))
    refs = torch.randn(b, r, 16, hr, wr)
    with torch.no_grad():
        cache = den.precompute_reference(refs, x["text"], x["image_context"], (f, h, w))
        recompute = time_call(lambda: den(**x, ref_latents=refs), repeats)
        cached = time_call(lambda: den(**x, ref_cache=cache), repeats)
        build = time_call(lambda: den.precompute_reference(refs, x["text"], x["image_context"], (f, h, w)), repeats)
    video_tokens = f * (h // 2) * (w // 2)
    return {"config": name, "video_tokens": video_tokens, "ref_tokens": r * (hr // 2) * (wr // 2),
            "recompute_ms": 1e3 * median(recompute), "cached_ms": 1e3 * median(cached),
            "cache_build_ms": 1e3 * median(build), "speedup": median(recompute) / median(cached),
            "samples_recompute_s": recompute, "samples_cached_s": cached}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rows = [measure(name, case, args.repeats) for name, case in tqdm(CASES.items(), desc="configs")]
    print(write_results("reference_cache", rows, [
        ("config", "config"), ("video_tokens", "video tokens"), ("ref_tokens", "reference tokens"),
        ("recompute_ms", "step, recompute (ms)"), ("cached_ms", "step, cached K/V (ms)"),
        ("speedup", "speed-up"), ("cache_build_ms", "one-time cache build (ms)"),
    ], args.out, {"batch": 2, "repeats": args.repeats, "cases": CASES}))


if __name__ == "__main__":
    main()
