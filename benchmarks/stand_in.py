"""Stand-In's per-step time with its reference K/V cached against recomputing the reference stream at every step.

    python -m benchmarks.stand_in [--cases tiny cpu] [--repeats 7] [--out benchmarks/results]

A Wan2.1-T2V transformer (random weights, diffusers layout) with a rank-128 Stand-In adapter in the converter's
format (``engine.adapters.stand_in``) runs as the served denoiser does (``engine.runtime.denoiser.Denoiser``):
cond + uncond rows batched, the request's context K/V kept. ``cached``: the reference stream's K/V built at the
first step (one row: it reads no prompt) and read by every later step; ``recompute``: the face's tokens run beside
the video at every step, in both rows (``--no-reference-cache``). Medians of ``--repeats`` steps after warm-up; the
one-time build of the cache is timed alone, for its one row and for the two rows a per-row build would take.
"""
from __future__ import annotations

import sys
from pathlib import Path

from engine.errors import UsageError

NAME = "stand-in"
HELP = "Stand-In: per-step time with the face's reference K/V cached vs recomputed at every step"

# (transformer changes, video latent (frames, height, width), face latent (height, width)): the face's tokens are
# about 3% of the video's, as Stand-In's 512x512 face beside an 81-frame 480x832 video (1024 vs 32760 tokens)
CASES = {
    "tiny": (dict(num_attention_heads=2, attention_head_dim=24, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=32),
             (5, 30, 52), (16, 16)),
    "cpu": (dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=4, text_dim=256,
                 freq_dim=256), (5, 30, 52), (16, 16)),
}
T2V = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
BATCH = 2  # cond + uncond, as the loop batches them


def stream_flops(cfg, video_tokens: int, face_tokens: int, rank: int, text_tokens: int = 512) -> tuple[int, int]:
    """Multiply-add FLOPs of one row's step: (the video stream, the face's stream) over every layer. The video's:
    q/k/v/out projections, attention over [video | face] keys, the cross-attention's q/out and its attention
    over the text (whose K/V the request keeps), the FFN; the face's: the projections with their rank-``rank``
    LoRA on q/k/v, its own attention and the FFN (no cross-attention). What the cache removes is the second."""
    d, f = cfg.inner_dim, cfg.ffn_dim
    n, r = video_tokens, face_tokens
    video = 2 * (4 * n * d * d + 2 * n * (n + r) * d + 2 * n * d * d + 2 * n * text_tokens * d + 2 * n * d * f)
    face = 2 * (4 * r * d * d + 3 * 2 * r * d * rank + 2 * r * r * d + 2 * r * d * f)
    return cfg.num_layers * video, cfg.num_layers * face


def build_case(root: Path, name: str) -> tuple[Path, Path]:
    """A Wan2.1-T2V directory (the tiny pipeline's other parts) with this case's transformer, and a Stand-In
    adapter for it; built once under ``root``."""
    import shutil

    import torch
    from diffusers import WanTransformer3DModel

    from engine.tiny import ensure_tiny, write_stand_in_adapter

    model_dir, adapter = root / f"stand-in-bench-{name}", root / f"stand-in-bench-{name}-adapter"
    config = {**T2V, **CASES[name][0]}
    if not (model_dir / "transformer" / "config.json").is_file():
        shutil.copytree(ensure_tiny(root, "tiny-standin"), model_dir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("transformer", "adapter"))
        torch.manual_seed(0)
        WanTransformer3DModel(**config).save_pretrained(model_dir / "transformer", safe_serialization=True)
    if not adapter.is_dir():
        write_stand_in_adapter(adapter, config, seed=1)
    return model_dir, adapter


def measure(name: str, root: Path, repeats: int) -> dict:
    import torch

    from engine.checkpoint import Checkpoint
    from engine.generation import DENOISER_INPUTS
    from engine.runtime.denoiser import Denoiser

    from .common import median, time_call

    model_dir, adapter = build_case(root, name)
    den = Denoiser(Checkpoint.load(model_dir, adapter, dtype="float32"))
    cfg = den.model.config
    (f, h, w), (hr, wr) = CASES[name][1:]
    gen = torch.Generator().manual_seed(0)
    face = torch.randn(1, 1, 16, hr, wr, generator=gen)
    inputs = {**dict.fromkeys(DENOISER_INPUTS), "latents": torch.randn(BATCH, 16, f, h, w, generator=gen),
              "timestep": torch.full((BATCH,), 500.0), "text": torch.randn(BATCH, 512, cfg.text_dim, generator=gen)}
    with_face = {**inputs, "ref_latents": face.expand(BATCH, -1, -1, -1, -1)}
    den(with_face, "cached")  # the first step builds the cache
    steps = {"cached": lambda: den(inputs, "cached"),
             "recompute": lambda: den(with_face, "recompute", cache_references=False)}
    builds = {rows: (lambda rows=rows: den.model.precompute_reference(
        face.expand(rows, -1, -1, -1, -1), inputs["text"][:rows], None, (f, h, w))) for rows in (1, BATCH)}
    # interleaved, one sample of each per round, so that a shared machine's load drifts over both alike
    samples = {key: [] for key in (*steps, *builds)}
    for fn in (*steps.values(), *builds.values()):
        time_call(fn, 0)  # warm-up
    for _ in range(repeats):
        for key, fn in (*steps.items(), *builds.items()):
            samples[key] += time_call(fn, 1, warmup=0)
    cached, recompute, build = samples["cached"], samples["recompute"], {rows: samples[rows] for rows in builds}
    video_tokens, face_tokens = f * (h // 2) * (w // 2), (hr // 2) * (wr // 2)
    video_flops, face_flops = stream_flops(cfg, video_tokens, face_tokens, rank=128)
    return {"config": name, "width": cfg.inner_dim, "layers": cfg.num_layers, "video_tokens": video_tokens,
            "face_tokens": face_tokens, "rows": BATCH, "face_flops_share": face_flops / (video_flops + face_flops),
            "recompute_ms": 1e3 * median(recompute), "cached_ms": 1e3 * median(cached),
            "speedup": median(recompute) / median(cached), "build_one_row_ms": 1e3 * median(build[1]),
            "build_per_row_ms": 1e3 * median(build[BATCH]), "samples_recompute_s": recompute,
            "samples_cached_s": cached}


COLUMNS = [("config", "config"), ("width", "width"), ("layers", "layers"), ("video_tokens", "video tokens"),
           ("face_tokens", "face tokens"), ("face_flops_share", "face stream's share of step FLOPs"),
           ("recompute_ms", "step, recompute (ms)"),
           ("cached_ms", "step, cached K/V (ms)"), ("speedup", "speed-up"),
           ("build_one_row_ms", "cache build, 1 row (ms)"), ("build_per_row_ms", "cache build, per row x2 (ms)")]


def add_arguments(p) -> None:
    p.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("out/benchmarks"))


def run(args) -> int:
    from .common import write_results

    if args.repeats < 1:
        raise UsageError(f"--repeats must be a positive integer, got {args.repeats}")
    import os

    load_before = os.getloadavg()
    rows = [measure(name, Path(args.cache_dir), args.repeats) for name in args.cases]
    # the machine's 1/5/15-minute load averages around the run: on a shared machine they say how far to trust it
    config = {"load_average": {"before": load_before, "after": os.getloadavg()},
              "batch": BATCH, "repeats": args.repeats, "dtype": "float32", "lora_rank": 128,
              "cases": {k: {"transformer": v[0], "video_latent": v[1], "face_latent": v[2]} for k, v in CASES.items()}}
    print(write_results("stand_in", rows, COLUMNS, args.out, config))
    return 0


def main(argv=None) -> int:
    from .common import standalone_main

    return standalone_main(sys.modules[__name__], argv, cache_dir=True)


if __name__ == "__main__":
    sys.exit(main())
