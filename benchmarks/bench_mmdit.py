"""``mvgen bench mmdit``: one denoiser step of the MMDiT (``engine.backbones.mmdit.model``, HunyuanVideo with MVI2V's triple stream)
beside diffusers' ``HunyuanVideoTransformer3DModel`` on the same saved weights and seeded inputs (batch 2: cond +
uncond, prompts of different lengths so the text padding is masked).

Rows: diffusers and the engine without references; diffusers with R references appended as known frames and the
engine's triple stream with a zero LoRA, ``shared`` positions and ``full`` attention (the two compute the same
function); the engine's triple stream as served (``decoupled`` positions, ``isolated`` attention), which diffusers
cannot express. Every timed pair is checked for parity first: a mismatch times nothing and exits 1. Medians of
``--repeats`` runs after ``--warmup``, device-synchronised, all in one process.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .common import bench_device, median, time_call, write_results

NAME = "mmdit"
HELP = "the MMDiT (HunyuanVideo, MVI2V's triple stream) vs diffusers: one denoiser step, parity checked first"
# (transformer arguments, latent frames/height/width, text tokens): "cpu" is HunyuanVideo's block layout and widths
# per head (head_dim 128, RoPE bands 16/56/56, Llama 4096-wide states, CLIP 768 pooled) at 4 heads and 2 + 4 blocks
CONFIGS = {
    "tiny": (dict(num_attention_heads=2, attention_head_dim=24, num_layers=1, num_single_layers=1,
                  num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(8, 8, 8)),
             (2, 4, 4), 16),
    "cpu": (dict(num_attention_heads=4, attention_head_dim=128, num_layers=2, num_single_layers=4,
                 num_refiner_layers=1, text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56)),
            (3, 16, 16), 256),
}
BASE = dict(in_channels=33, out_channels=16, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
            guidance_embeds=False, rope_theta=256.0, image_condition_type="latent_concat")
PARITY_TOL = {torch.float32: 1e-4}


def add_arguments(p) -> None:
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu", help="model and latent size (default cpu)")
    p.add_argument("--refs", type=int, default=3, help="reference views of the R > 0 rows (default 3)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))


def _inputs(config: dict, fhw, text_len: int, refs: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    f, h, w = fhw
    first = torch.randn(2, 16, 1, h, w, generator=g)
    condition = torch.cat([torch.cat([first, torch.zeros(2, 16, f - 1, h, w)], 2),
                           torch.cat([torch.ones(2, 1, 1, h, w), torch.zeros(2, 1, f - 1, h, w)], 2)], 1)
    mask = (torch.arange(text_len)[None] < torch.tensor([[text_len], [text_len // 3]])).float()
    x = dict(latents=torch.randn(2, 16, f, h, w, generator=g), condition=condition, timestep=torch.tensor([700., 700.]),
             text=torch.randn(2, text_len, config["text_embed_dim"], generator=g), text_mask=mask,
             pooled_text=torch.randn(2, config["pooled_projection_dim"], generator=g),
             ref_latents=torch.randn(2, refs, 16, h, w, generator=g))
    return {k: v.to(device) for k, v in x.items()}


def _diffusers_call(model, x, with_refs: bool):
    latents, condition = x["latents"], x["condition"]
    if with_refs:
        refs = x["ref_latents"].transpose(1, 2)
        latents = torch.cat([latents, refs], 2)
        condition = torch.cat([condition, torch.cat([refs, torch.ones_like(refs[:, :1])], 1)], 2)
    hidden = torch.cat([latents, condition], 1)
    frames = x["latents"].shape[2]
    return lambda: model(hidden, x["timestep"], x["text"], x["text_mask"], x["pooled_text"],
                         return_dict=False)[0][:, :, :frames]


def run(args) -> int:
    from diffusers import HunyuanVideoTransformer3DModel

    from engine.backbones.registry import load_denoiser

    if args.threads:
        torch.set_num_threads(args.threads)
    device = bench_device(args.device)
    overrides, fhw, text_len = CONFIGS[args.config]
    config = {**BASE, **overrides}
    torch.manual_seed(0)
    reference = HunyuanVideoTransformer3DModel(**config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = _inputs(config, fhw, text_len, args.refs, device)
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        reference.save_pretrained(Path(folder) / "transformer")
        reference = reference.to(device)
        same = load_denoiser(folder, device=device, ref_rope="shared", ref_timestep="shared", ref_attention="full")
        served = load_denoiser(folder, device=device, ref_rope="decoupled", ref_attention="isolated")
        no_refs = {**x, "ref_latents": None}
        pairs = [("R = 0", _diffusers_call(reference, x, False), lambda: same(**no_refs)),
                 (f"R = {args.refs}, shared/full", _diffusers_call(reference, x, True), lambda: same(**x))]
        for label, oracle, engine in pairs:
            want, got = oracle(), engine()
            err = float((got - want).norm() / want.norm())
            if err > PARITY_TOL[torch.float32]:
                print(f"parity failed at {label}: relative error {err:.2e}; nothing timed")
                return 1
            d, e = (median(time_call(fn, args.repeats, args.warmup)) for fn in (oracle, engine))
            rows.append(dict(case=label, diffusers_ms=d * 1e3, engine_ms=e * 1e3, ratio=e / d, parity=err,
                             video_tokens=fhw[0] * fhw[1] * fhw[2] // 4, text_tokens=text_len,
                             ref_tokens=0 if label == "R = 0" else args.refs * fhw[1] * fhw[2] // 4))
        t = median(time_call(lambda: served(**x), args.repeats, args.warmup))
        rows.append(dict(case=f"R = {args.refs}, decoupled/isolated (served modes)", engine_ms=t * 1e3,
                         video_tokens=fhw[0] * fhw[1] * fhw[2] // 4, text_tokens=text_len,
                         ref_tokens=args.refs * fhw[1] * fhw[2] // 4))
    columns = [("case", "case"), ("video_tokens", "video tokens"), ("ref_tokens", "reference tokens"),
               ("text_tokens", "text tokens"), ("diffusers_ms", "diffusers ms"), ("engine_ms", "engine ms"),
               ("ratio", "engine / diffusers"), ("parity", "parity (rel. err)")]
    print(write_results(f"mmdit_{args.config}", rows, columns, args.out,
                        {"config": args.config, "transformer": config, "latent_fhw": fhw, "text_len": text_len,
                         "refs": args.refs, "repeats": args.repeats, "warmup": args.warmup, "device": device,
                         "dtype": "float32"}))
    return 0


if __name__ == "__main__":
    import sys

    from .common import standalone_main

    sys.exit(standalone_main(sys.modules[__name__]))
