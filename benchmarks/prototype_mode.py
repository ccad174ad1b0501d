"""Per-step denoiser time against the number of references: ``full`` joint attention vs ProFashion's ``prototype``.

    python -m benchmarks.prototype_mode [--out out/benchmarks] [--repeats 5]

A CPU-sized Wan (8 layers x 512 wide) on float32 under ``torch.no_grad``; a step is one denoiser call on the
conditional + unconditional rows. ``prototype`` recomputes the reference stream every step
(``ref_timestep="shared"``); ``prototype, cached`` reuses its per-request features (``ref_timestep="zero"``,
``precompute_reference``), so only the pose selectors and the aggregation see R. The attention FLOPs per layer
and row (``engine.modes.prototype.attention_flops``) are reported beside the times.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from engine.config import MvgenConfig
from engine.backbones.wan.model import MultiViewWanTransformer
from engine.modes.prototype import attention_flops

from .common import median, time_call, write_results

MODEL = dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=1024, num_layers=8, text_dim=256, freq_dim=256,
             image_dim=256, added_kv_proj_dim=512, text_len=512)
VIDEO = (4, 16, 16)  # latent frames, height, width: 4 x 8 x 8 = 256 video tokens
REF_HW = (16, 16)  # each reference: 64 tokens
REFS = (1, 3, 8)
MODES = {  # name: (ref_attention, ref_timestep, cached)
    "full": ("full", "shared", False),
    "prototype": ("prototype", "shared", False),
    "prototype, cached": ("prototype", "zero", True),
}
BATCH = 2  # conditional + unconditional, as the pipeline batches them


def step_inputs(cfg: MvgenConfig, num_refs: int, gen: torch.Generator) -> dict:
    f, h, w = VIDEO
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return dict(latents=r(BATCH, 16, f, h, w), condition=r(BATCH, 20, f, h, w), timestep=torch.full((BATCH,), 500.0),
                text=r(BATCH, cfg.text_len, cfg.text_dim), image_context=r(BATCH, 257, cfg.image_dim),
                ref_latents=r(BATCH, num_refs, 16, *REF_HW))


def measure(mode: str, num_refs: int, repeats: int, seed: int = 0) -> dict:
    ref_attention, ref_timestep, cached = MODES[mode]
    torch.manual_seed(seed)
    cfg = MvgenConfig(**MODEL, ref_attention=ref_attention, ref_timestep=ref_timestep, max_references=max(REFS))
    den = MultiViewWanTransformer(cfg).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    x = step_inputs(cfg, num_refs, gen)
    if ref_attention == "prototype":
        x["frame_pose"] = torch.rand(BATCH, VIDEO[0], cfg.pose_channels, *VIDEO[1:], generator=gen) * 2 - 1
        x["ref_pose"] = torch.rand(BATCH, num_refs, cfg.pose_channels, *REF_HW, generator=gen) * 2 - 1
    with torch.no_grad():
        if cached:
            cache = den.precompute_reference(x["ref_latents"], x["text"], x["image_context"], VIDEO)
            x = {**x, "ref_latents": None, "ref_cache": cache}
        samples = time_call(lambda: den(**x), repeats)
    flops = attention_flops(cfg, *VIDEO, num_refs, REF_HW)
    per_step = flops["full"] if ref_attention == "full" else flops["prototype"] + flops["prototype_selector"] + (
        0 if cached else flops["prototype_reference"])
    return {"mode": mode, "refs": num_refs, "step_ms": 1e3 * median(samples),
            "joint_attention_mflops": flops[ref_attention] / 1e6, "attention_mflops_per_step": per_step / 1e6,
            "samples_s": samples}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cases = [(mode, r) for mode in MODES for r in REFS]
    rows = [measure(mode, r, args.repeats) for mode, r in tqdm(cases, desc="cases")]
    print(write_results("prototype_mode", rows, [
        ("mode", "mode"), ("refs", "R"), ("step_ms", "step (ms, median)"),
        ("joint_attention_mflops", "joint attention MFLOP / layer / row"),
        ("attention_mflops_per_step", "all attention MFLOP / layer / row, per step"),
    ], args.out, {"batch": BATCH, "repeats": args.repeats, "model": MODEL, "video": VIDEO, "ref_hw": REF_HW,
                  "dtype": "float32", "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
