"""Real-hardware correctness of every kernel against its float64 reference (the GPU half of the kernel tests).

    python -m benchmarks.gpu_checks [--out out/gpu]

The interpreter tests prove the kernels' logic on CPU; this runs the compiled kernels on the GPU, with the
fast trigonometry and the autotuned tiles that only exist there, at awkward sizes and at a Wan-sized
sequence, plus the whole denoiser with its attention on the kernel. Outputs are NaN-poisoned before each
launch. Writes ``gpu_checks.json``/``.md``; exits 1 if a check fails, prints "skipped: no CUDA device" (exit 0)
without a GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import kernels
from engine.config import MvgenConfig
from engine.backbones.wan.model import MultiViewWanTransformer

from .common import write_results

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def attention_case(gen, dtype, head_dim, mask, n_video, n_ref, heads=3, batch=2, device="cuda", backend="triton"):
    n = n_video + n_ref
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    pos = torch.randint(-40, 60, (n, 3), generator=gen).to(device)
    key_scale = torch.cat([torch.ones(n_video), torch.rand(n_ref, generator=gen) * 1.5 + 0.25]).to(device)
    kw = dict(q_offsets=(n_video, n), k_offsets=(n_video, n), key_scale=key_scale, mask=mask, tokens_per_frame=7,
              proto_tokens=3)
    out = torch.full_like(q, float("nan"))
    kernels.joint_attention(q, k, v, pos, pos, backend=backend, out=out, **kw)
    want = kernels.joint_attention_reference(q.double(), k.double(), v.double(), pos, pos,
                                             **{**kw, "key_scale": key_scale.double()})
    return rel_err(out, want), bool(torch.isfinite(out).all())


def check_attention(gen):
    rows = []
    for dtype in TOLERANCE:
        for head_dim in (64, 128):
            for mask in ("full", "isolated", "prototype"):
                for n_video, n_ref in ((133, 0), (250, 3 * 45), (4095, 771)):
                    if mask == "prototype" and n_ref == 0:
                        continue
                    for backend in ("triton", "sdpa"):  # prologue kernel + each attention path
                        err, finite = attention_case(gen, dtype, head_dim, mask, n_video, n_ref, backend=backend)
                        rows.append(dict(check=f"joint_attention ({backend})", dtype=str(dtype).split(".")[-1],
                                         head_dim=head_dim, mask=mask, tokens=f"{n_video}+{n_ref}", rel_err=err,
                                         ok=finite and err < TOLERANCE[dtype]))
    return rows


def check_small_kernels(gen):
    rows = []
    r = lambda *s: torch.randn(*s, generator=gen).cuda()  # noqa: E731
    for dtype in TOLERANCE:
        pose_q, pose_k, feats = r(2, 5, 37, 48).to(dtype), r(2, 3 * 99, 48).to(dtype), r(2, 3, 99, 160).to(dtype)
        got = kernels.prototype_aggregate(pose_q, pose_k, feats, backend="triton")[0]
        want = kernels.prototype_aggregate_reference(pose_q.double(), pose_k.double(), feats.double())[0]
        cases = {"prototype_aggregate": (got, want)}
        x, shift, scale = r(2, 333, 1536).to(dtype), r(2, 1, 1536).float(), r(2, 1, 1536).float()
        cases["adaln_layernorm"] = (kernels.adaln_layernorm(x, shift, scale, backend="triton"),
                                    kernels.adaln_layernorm_reference(x.double(), shift.double(), scale.double()))
        za, zb = r(2, 333, 1536).to(dtype), r(2, 333, 1536).to(dtype)
        cases["distribution_fusion"] = (kernels.distribution_fusion(za, zb, backend="triton"),
                                        kernels.distribution_fusion_reference(za.double(), zb.double()))
        q, k = r(2, 333, 12, 128).to(dtype), r(2, 301, 12, 128).to(dtype)
        qp, kp = (torch.randint(-120, 120, (n, 3), generator=gen).cuda() for n in (333, 301))
        wq, wk, ks = r(1536), r(1536), r(301).abs() + 0.25
        got_q, got_k = kernels.qk_prologue(q, k, qp, kp, weight_q=wq, weight_k=wk, q_scale=0.13, key_scale=ks,
                                           backend="triton")
        want_q, want_k = kernels.qk_prologue_reference(q.double(), k.double(), qp, kp, weight_q=wq.double(),
                                                       weight_k=wk.double(), q_scale=0.13, key_scale=ks.double())
        cases["qk_prologue (q)"], cases["qk_prologue (k)"] = (got_q, want_q), (got_k, want_k)
        for name, (got, want) in cases.items():
            err = rel_err(got, want)
            rows.append(dict(check=name, dtype=str(dtype).split(".")[-1], rel_err=err,
                             ok=bool(torch.isfinite(got).all()) and err < TOLERANCE[dtype]))
    return rows


def check_denoiser():
    """A 2-layer denoiser at 1.3B width: kernel attention vs the reference path, bf16, with 3 references."""
    torch.manual_seed(0)
    cfg = MvgenConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=2, text_dim=4096,
                      image_dim=1280, added_kv_proj_dim=1536, view_logit_scales=(0.7, 1.0, 1.3))
    den = MultiViewWanTransformer(cfg).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    den.init_reference_stream_from_base()
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    x = dict(latents=r(2, 16, 5, 30, 52), condition=r(2, 20, 5, 30, 52), timestep=torch.full((2,), 700.0,
             device="cuda"), text=r(2, 512, 4096), image_context=r(2, 257, 1280), ref_latents=r(2, 3, 16, 30, 30))
    rows = []
    with torch.no_grad():
        den.config = cfg.replace(attention_backend="reference")
        want = den(**x)
        for backend in ("triton", "sdpa", "auto"):
            den.config = cfg.replace(attention_backend=backend)
            got = den(**x)
            err = rel_err(got, want)
            rows.append(dict(check=f"denoiser (1.3B width, 2 layers, {backend})", dtype="bfloat16", rel_err=err,
                             ok=bool(torch.isfinite(got).all()) and err < 2e-2))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/gpu"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    gen = torch.Generator().manual_seed(0)
    rows = check_attention(gen) + check_small_kernels(gen) + check_denoiser()
    print(write_results("gpu_checks", rows, [("check", "check"), ("dtype", "dtype"), ("head_dim", "head dim"),
                                             ("mask", "mask"), ("tokens", "tokens"), ("rel_err", "rel. error"),
                                             ("ok", "ok")], args.out, {"tolerance": {str(k): v for k, v in
                                                                                    TOLERANCE.items()}}))
    failed = [row for row in rows if not row["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
