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

``--precision int8`` benchmarks the 8-bit attention instead (``kernels.quantized_attention``: INT8 QK^T, FP8 P.V on
sm_89+), on the prologue's outputs at Wan 1.3B and 14B shapes (480p, 81 frames, 3 references; ``--quick``: 1.3B),
against the 16-bit Triton kernel, SDPA pinned to flash and to cuDNN, and ``sageattention.sageattn`` when it
imports; the 8-bit rows split into quantisation + kernel, the kernel on pre-quantised operands, and the
quantisation alone. Every row also gives its error against float32 attention on the first 1024 queries; an 8-bit
error above ``INT8_ERROR_LIMIT`` fails the run (exit 1). Writes ``kernels_int8.json`` and ``kernels_int8.md``.
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


INT8_ERROR_LIMIT = 0.08  # relative error against float32; the float64 reference of the same arithmetic: ~0.03-0.05
CHECK_QUERIES = 1024  # float32 attention of these queries over every key is the check (14B: ~6 GB of logits)


def int8_methods(n_video, n, device):
    """The 8-bit attention and its baselines on rotated, scaled Q/K (``kernels.attention``'s inputs); the 8-bit
    attention also as its two parts: the quantisation, and the kernel on operands quantised beforehand."""
    import math

    import kernels
    from kernels.quantized_attention import default_pv
    from kernels.quantized_attention.kernel import quantized_attention_triton

    offsets = dict(q_offsets=(n_video, n), k_offsets=(n_video, n))
    pv = default_pv(device)
    methods = {
        f"int8 QK + {pv} PV (quantise + kernel)": lambda q, k, v: kernels.attention(q, k, v, **offsets,
                                                                                     backend="triton", precision="int8"),
        f"int8 QK + {pv} PV: quantisation only": lambda q, k, v: _quantize(q, k, v, pv),
        f"int8 QK + {pv} PV: kernel only": None,  # on the quantisation's outputs: bench_int8_attention fills it in
        "bf16 Triton kernel": lambda q, k, v: kernels.attention(q, k, v, **offsets, backend="triton"),
        "SDPA flash": _sdpa_base2("FLASH_ATTENTION"),
        "SDPA cuDNN": _sdpa_base2("CUDNN_ATTENTION"),
    }
    if pv == "fp8":  # what sm_80 runs, on this GPU
        methods["int8 QK + 16bit PV (quantise + kernel)"] = lambda q, k, v: quantized_attention_triton(
            q, k, v, **offsets, pv="16bit")
    with contextlib.suppress(ImportError):
        from sageattention import sageattn
        # the operands carry the base-2 softmax scale: sm_scale ln 2 gives the same attention
        methods["sageattention"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD", is_causal=False,
                                                            sm_scale=math.log(2.0))
    return methods


def _sdpa_base2(backend_name):
    """SDPA pinned to a backend on prologue outputs (base-2 logits: scale ln 2)."""
    import math

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=math.log(2.0)).transpose(1, 2)
    return run


def _quantize(q, k, v, pv):
    """The 8-bit attention's quantisation passes as its launcher runs them: (QuantizedQK, V operand, V scales)."""
    from kernels.quantized_attention.kernel import gpu_config, key_block
    from kernels.quantized_attention.quantize import quantize_qk_triton, quantize_v_triton

    config = gpu_config(q.device, q.shape[-1], pv=pv)
    quantized = quantize_qk_triton(q, k, block_q=config["BLOCK_M"], block_k=key_block(config["BLOCK_N"]))
    if pv == "fp8":
        return (quantized, *quantize_v_triton(v, emulate=False, block=quantized.block_k, tile=config["BLOCK_N"]))
    return quantized, v, quantized.k_scale  # the scale operand is unread without FP8


def _kernel_only(operands, like, n_video, n, pv):
    """A function launching the 8-bit kernel alone on ``_quantize``'s outputs, as its launcher does, writing a tensor
    like ``like`` (the 16-bit Q)."""
    from kernels.quantized_attention import kernel

    quantized, v_operand, v_scale = operands
    config = kernel.gpu_config(quantized.q.device, quantized.q.shape[-1], pv=pv)
    out = torch.empty_like(like)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    args, meta = (kernel.launch_args if hopper else kernel.pointer_args)(
        quantized, v_operand, v_scale, out, q_offsets=(n_video, n), k_offsets=(n_video, n), pv=pv,
        block_n=config["BLOCK_N"])
    entry = kernel._quantized_fwd_tma if hopper else kernel._quantized_fwd
    grid = (-(-n // config["BLOCK_M"]), quantized.q.shape[0] * quantized.q.shape[2])

    def run(q, k, v):
        entry[grid](*args, **meta, num_warps=config["num_warps"], num_stages=config["num_stages"])
        return out
    return run


def bench_int8_attention(case, repeats):
    """(rows, failed): every method's time, TFLOP/s and error against float32 on the first CHECK_QUERIES queries;
    ``failed`` when an 8-bit method's error passes INT8_ERROR_LIMIT."""
    import math

    import kernels
    from kernels.quantized_attention import default_pv

    device, dtype = "cuda", torch.bfloat16
    pos, n_video = positions(case, device)
    n = pos.shape[0]
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, n, case["heads"], case["head_dim"], device=device, generator=gen) for _ in range(3))
    k = k + torch.randn(case["heads"], case["head_dim"], device=device, generator=gen)  # a shared channel offset
    q = (q * kernels.LOG2E / math.sqrt(case["head_dim"])).to(dtype)
    k, v = k.to(dtype), v.to(dtype)
    exact = _sdpa_base2("MATH")(q[:, :CHECK_QUERIES].float(), k.float(), v.float())
    flops = 4 * case["heads"] * n * n * case["head_dim"]
    pv = default_pv(q.device)
    methods = int8_methods(n_video, n, q.device)
    methods[f"int8 QK + {pv} PV: kernel only"] = _kernel_only(_quantize(q, k, v, pv), q, n_video, n, pv)
    rows, failed = [], False
    for name, fn in methods.items():
        row = dict(case, op="joint_attention int8", method=name, tokens=n, video_hw=str(case["video_hw"]),
                   ref_hw=str(case["ref_hw"]))
        try:
            samples = time_call(lambda: fn(q, k, v), repeats, warmup=3)
        except RuntimeError as exc:  # a pinned SDPA backend this build/device does not offer
            row.update(note=f"unavailable: {str(exc).splitlines()[0][:120]}")
            rows.append(row)
            continue
        row.update(ms=1e3 * median(samples), samples_s=samples)
        if "quantisation only" not in name:
            out = fn(q, k, v)
            error = ((out[:, :CHECK_QUERIES].float() - exact).norm() / exact.norm()).item()
            row.update(tflops=flops / median(samples) / 1e12, rel_err=error)
            if name.startswith("int8") and not error < INT8_ERROR_LIMIT:
                row["note"] = f"error {error:.3g} above {INT8_ERROR_LIMIT}"
                failed = True
        rows.append(row)
    return rows, failed


def int8_cases(quick: bool):
    """Wan 1.3B and 14B at 480p, 81 frames, 3 references (``quick``: 1.3B)."""
    return [c for c in attention_cases(quick) if c["resolution"] == "480p" and c["refs"] == 3]


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
    parser.add_argument("--precision", choices=("bf16", "int8"), default="bf16",
                        help="bf16: the 16-bit kernels' rows; int8: the 8-bit attention's rows (kernels_int8.*)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    import triton

    if args.precision == "int8":
        return run_int8(args)

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


def run_int8(args) -> int:
    import triton

    rows, failed = [], False
    for case in int8_cases(args.quick):
        case_rows, case_failed = bench_int8_attention(case, args.repeats)
        rows, failed = rows + case_rows, failed or case_failed
        torch.cuda.empty_cache()
    config = dict(repeats=args.repeats, quick=args.quick, dtype="bfloat16", batch=1, frames=FRAMES,
                  check_queries=CHECK_QUERIES, error_limit=INT8_ERROR_LIMIT, triton=triton.__version__,
                  cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                  capability=".".join(map(str, torch.cuda.get_device_capability())))
    print(write_results("kernels_int8", rows, [
        ("model", "model"), ("resolution", "res"), ("refs", "refs"), ("tokens", "tokens"), ("method", "method"),
        ("ms", "ms"), ("tflops", "TFLOP/s"), ("rel_err", "error vs fp32"), ("note", "note"),
    ], args.out, config))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
