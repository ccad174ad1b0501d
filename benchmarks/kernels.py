"""GPU benchmarks of the Triton kernels against their PyTorch (and FlashAttention) baselines.

    python -m benchmarks.kernels [--out out/benchmarks] [--repeats 10] [--quick]

joint_attention at Wan shapes (1.3B: 12 x 128 heads, 14B: 40 x 128; 81 frames -> 21 latent frames at 480p
(30 x 52 tokens per frame) and 720p (45 x 80); 0 or 3 references of 480x480 / 720x720 -> 30x30 / 45x45
tokens each), batch 1, mask ``full``, per-view key scales when references are present: the engine's paths
(QK prologue kernel, then the Triton kernel or SDPA on the rotated tensors; the prologue alone) against
  - RoPE (and key scales) applied with PyTorch, then SDPA pinned to the flash and to the cuDNN backend;
  - SDPA (flash, cuDNN) on the same tensors without RoPE: the bare attention the kernel must stay near;
  - RoPE with PyTorch, then FlashAttention's ``flash_attn_func``, if ``flash_attn`` is importable.
TFLOP/s counts 4 * B * H * Nq * Nk * D. PPA and the small fusions are reported in GB/s (bytes that must move
at least once) against their references. Medians over ``--repeats`` runs after warm-up, CUDA-synchronised.
Writes ``kernels.json`` and ``kernels.md`` (benchmarks.common format). Without CUDA it prints
"skipped: no CUDA device" and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from .common import median, time_call, write_results

FRAMES = 21
RESOLUTIONS = {"480p": ((30, 52), (30, 30)), "720p": ((45, 80), (45, 45))}  # video (h, w), reference (h, w)
MODELS = {"1.3B": (12, 1536), "14B": (40, 5120)}  # heads (x 128), hidden size
POSE_DIM = 64


def attention_cases(quick: bool):
    for model, (heads, _) in MODELS.items():
        for res, (video_hw, ref_hw) in RESOLUTIONS.items():
            for refs in (0, 3):
                if quick and (model, res) != ("1.3B", "480p"):
                    continue
                yield dict(model=model, heads=heads, head_dim=128, resolution=res, video_hw=video_hw,
                           ref_hw=ref_hw, refs=refs)


def positions(case, device):
    """Video grid positions then RD-RoPE reference positions (reference k at t = -(k + 1))."""
    def grid(t_values, h, w):
        t, y, x = torch.meshgrid(torch.as_tensor(t_values), torch.arange(h), torch.arange(w), indexing="ij")
        return torch.stack([t, y, x], -1).reshape(-1, 3)

    video = grid(range(FRAMES), *case["video_hw"])
    refs = [grid([-(k + 1)], *case["ref_hw"]) for k in range(case["refs"])]
    return torch.cat([video, *refs]).to(device), video.shape[0]


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


def _rope_then(attend, pos, key_scale):
    from kernels.rope import apply_rope, rope_angles

    def run(q, k, v):
        angles = rope_angles(pos, q.shape[-1])
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        if key_scale is not None:
            k = k * key_scale[None, :, None, None].to(k.dtype)
        return attend(q, k, v)
    return run


def attention_methods(pos, n_video, key_scale):
    """Each way to compute the joint attention from unrotated Q/K: the engine's paths (QK prologue kernel, then
    the Triton kernel or SDPA on the rotated tensors), RoPE in PyTorch then SDPA/flash_attn (what a hand-rolled
    script does), and bare SDPA without RoPE (the floor). ``prologue only`` is the prologue's share."""
    import kernels

    def ours(backend):
        offsets = (n_video, pos.shape[0])
        return lambda q, k, v: kernels.joint_attention(q, k, v, pos, pos, q_offsets=offsets, k_offsets=offsets,
                                                       key_scale=key_scale, backend=backend)

    methods = {
        "prologue + triton": ours("triton"),
        "prologue + SDPA (auto)": ours("sdpa"),
        "prologue only": lambda q, k, v: kernels.qk_prologue(q, k, pos, pos, q_scale=0.127, key_scale=key_scale,
                                                             backend="triton"),
        "RoPE + SDPA flash": _rope_then(_sdpa("FLASH_ATTENTION"), pos, key_scale),
        "RoPE + SDPA cuDNN": _rope_then(_sdpa("CUDNN_ATTENTION"), pos, key_scale),
        "SDPA flash, no RoPE": _sdpa("FLASH_ATTENTION"),
        "SDPA cuDNN, no RoPE": _sdpa("CUDNN_ATTENTION"),
    }
    with contextlib.suppress(ImportError):
        from flash_attn import flash_attn_func
        methods["RoPE + flash_attn"] = _rope_then(flash_attn_func, pos, key_scale)
    return methods


def bench_attention(case, repeats):
    device, dtype = "cuda", torch.bfloat16
    pos, n_video = positions(case, device)
    n = pos.shape[0]
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, n, case["heads"], case["head_dim"], device=device, dtype=dtype, generator=gen)
               for _ in range(3))
    key_scale = None
    if case["refs"]:
        key_scale = torch.ones(n, device=device)
        key_scale[n_video:] = torch.linspace(0.5, 2.0, case["refs"], device=device).repeat_interleave(
            (n - n_video) // case["refs"])
    flops = 4 * case["heads"] * n * n * case["head_dim"]
    rows = []
    for name, fn in attention_methods(pos, n_video, key_scale).items():
        row = dict(case, op="joint_attention", method=name, tokens=n, video_hw=str(case["video_hw"]),
                   ref_hw=str(case["ref_hw"]))
        try:
            samples = time_call(lambda: fn(q, k, v), repeats, warmup=3)
        except RuntimeError as exc:  # e.g. a pinned SDPA backend that this build/device does not offer
            row.update(note=f"unavailable: {str(exc).splitlines()[0][:120]}")
            rows.append(row)
            continue
        row.update(ms=1e3 * median(samples), tflops=flops / median(samples) / 1e12, samples_s=samples)
        rows.append(row)
    from kernels.joint_attention.kernel import _attention_tuned
    best = getattr(_attention_tuned, "best_config", None)
    rows[0]["note"] = f"autotuned: {best}" if best is not None else ""
    return rows


def bench_memory_bound(quick, repeats):
    """PPA and the fusions: GB/s of kernel and reference (minimum bytes moved)."""
    import kernels

    device, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    rows = []
    for model, (_, hidden) in MODELS.items():
        for res, (video_hw, ref_hw) in RESOLUTIONS.items():
            if quick and (model, res) != ("1.3B", "480p"):
                continue
            per_frame, per_ref = video_hw[0] * video_hw[1], ref_hw[0] * ref_hw[1]
            tokens = FRAMES * per_frame
            pose_q, pose_k = randn(1, FRAMES, per_frame, POSE_DIM), randn(1, 3 * per_ref, POSE_DIM)
            feats = randn(1, 3, per_ref, hidden)
            x, y = randn(1, tokens, hidden), randn(1, tokens, hidden)
            mod = torch.randn(1, 1, hidden, device=device, generator=gen)
            elt = 2  # bytes per bf16 element
            ops = {
                "prototype_aggregate": (lambda b: kernels.prototype_aggregate(pose_q, pose_k, feats, backend=b),
                                        elt * (pose_q.numel() + pose_k.numel() + feats.numel()
                                               + FRAMES * per_ref * hidden) + 4 * FRAMES * 3 * per_ref),
                "adaln_layernorm": (lambda b: kernels.adaln_layernorm(x, mod, mod, backend=b), 2 * elt * x.numel()),
                "gated_residual": (lambda b: kernels.gated_residual(x, y, mod, backend=b), 3 * elt * x.numel()),
                "distribution_fusion": (lambda b: kernels.distribution_fusion(x, y, backend=b), 3 * elt * x.numel()),
            }
            for op, (fn, nbytes) in ops.items():
                for backend in ("triton", "reference"):
                    samples = time_call(lambda: fn(backend), repeats, warmup=3)
                    rows.append(dict(op=op, model=model, resolution=res, method=backend, tokens=tokens,
                                     ms=1e3 * median(samples), gbps=nbytes / median(samples) / 1e9,
                                     samples_s=samples))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="only the 1.3B 480p shapes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    import triton

    rows = []
    for case in attention_cases(args.quick):
        rows += bench_attention(case, args.repeats)
        torch.cuda.empty_cache()
    rows += bench_memory_bound(args.quick, args.repeats)
    config = dict(repeats=args.repeats, quick=args.quick, dtype="bfloat16", batch=1, frames=FRAMES,
                  pose_dim=POSE_DIM, triton=triton.__version__, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version())
    print(write_results("kernels", rows, [
        ("op", "op"), ("model", "model"), ("resolution", "res"), ("refs", "refs"), ("tokens", "tokens"),
        ("method", "method"), ("ms", "ms"), ("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("note", "note"),
    ], args.out, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
