"""Compile every Triton kernel as it is launched, for sm_90 and sm_80 without a GPU, and read what ptxas and the
disassembly say.

    python -m kernels.compile_check [--arch 90 80] [--jobs 2] [--json out.json] [--markdown out.md]
                                    [--tutorial PATH/TO/06-fused-attention.py] [--kernel NAME ...]

Each variant is compiled through the kernel's own ``JITFunction.warmup`` on CPU tensors of a real geometry
(Wan2.1 1.3B at 480p, 81 frames, three references: 32760 video + 4680 reference tokens, 12 heads of 128; the
three-stream variants add HunyuanVideo's 256 text tokens as the context stream, with per-row key lengths), with
a compile-only CUDA driver for the requested target: the JIT specialises the arguments exactly as a launch on
a GPU does (16-byte aligned pointers and strides get ``tt.divisibility=16``, ints equal to 1 become
constants), so registers, spills and shared memory are those of the kernel that runs. The launch arguments
come from the kernels' own ``launch_args`` (the launchers build theirs with the same function). The small
kernels whose launchers have no such builder (PPA, fusions) go through ``triton.compile`` with the same
alignment attributes on their pointers.

Per variant: registers, spills, stack (ptxas ``-v``), shared memory (kernel metadata), the MMA instruction
family (PTX), and from the cubin's disassembly (Triton's bundled ``nvdisasm``) the hot loop: the backward
branch whose body holds the most tensor-core instructions; its SASS instruction count per warp, normalised
to a 64-key tile, its MUFU operations (exp2, and sin/cos, which must be absent from the attention loop).
The 8-bit attention (``kernels.quantized_attention``) is compiled as it launches per arch: descriptors with INT8 QK
and FP8 P.V on sm_90, pointers with FP8 P.V on sm_89 (``--arch 89``), with 16-bit P.V on sm_80; its loop's MMA
opcodes are listed (``loop MMAs``: IGMMA/IMMA integer, QGMMA/QMMA e4m3) and compared with the 16-bit loop at the
same 128x128 tile. ``--tutorial`` also compiles Triton's fused-attention tutorial kernel (``_attn_fwd_tma`` of
``python/tutorials/06-fused-attention.py``, non-causal, fp16 (its only dtype), head_dim 128, 128x64 tiles) the same way, for the
loop-size comparison. Exit status: 0 all compiled, 1 a variant failed, 3 the CUDA backend cannot compile on
this machine at all (reason printed after ``skipped:``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

BACKEND_UNAVAILABLE = 3
# the geometry every variant is specialised for (see the module docstring)
VIDEO_TOKENS, REF_TOKENS, HEADS, TOKENS_PER_FRAME = 32760, 4680, 12, 1560
CONTEXT_TOKENS = 256  # HunyuanVideo's text stream (padded to its maximum length; key lengths mask the padding)
HUNYUAN_HEADS, HUNYUAN_ROPE_AXES = 24, (16, 56, 56)


@dataclass(frozen=True)
class Variant:
    """One compilation: ``builder`` ("module:function") returns (jit function, args, kwargs) for a warmup,
    ``params`` being its keyword arguments (picklable, so variants travel to worker processes); ``builder``
    None: ``params`` name the kernel, its pointer types and constexprs for ``triton.compile``."""
    kernel: str
    label: str
    builder: str | None
    params: dict
    num_warps: int
    num_stages: int


@dataclass
class Result:
    kernel: str
    label: str
    arch: int
    num_warps: int
    num_stages: int
    ok: bool
    seconds: float = 0.0
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    mma: str = ""
    loop_sass: int | None = None  # SASS instructions per warp in one iteration of the hot loop
    loop_keys: int | None = None  # keys (or rows) one iteration consumes
    sass_per_64: float | None = None  # loop_sass normalised to a 64-key tile
    loop_mufu: int | None = None
    loop_mma: str = ""  # the hot loop's tensor-core SASS by opcode, e.g. "IGMMA:4 QGMMA:2" (integer, FP8)
    loop_trig: int | None = None  # MUFU.SIN / MUFU.COS in the loop
    loops: int | None = None  # backward branches holding tensor-core instructions (warp specialisation: > 1)
    error: str = field(default="", repr=False)


# ---- launch-argument builders (run in the worker, on CPU tensors) -----------------------------------------
def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _qkv(dtype: str, tokens: int, heads: int = HEADS, head_dim: int = 128):
    import torch

    return torch.empty(1, tokens, heads, head_dim, dtype=_torch_dtype(dtype))


def _streams(context: bool, key_len: bool):
    """(token count, stream offsets, key lengths): [video | reference] (Wan), or [video | reference | text]
    (HunyuanVideo), with per-row key lengths that cut into the text's padding when ``key_len``."""
    import torch

    n = VIDEO_TOKENS + REF_TOKENS + (CONTEXT_TOKENS if context else 0)
    lengths = torch.tensor([n - CONTEXT_TOKENS // 2], dtype=torch.int32) if key_len else None
    return n, (VIDEO_TOKENS, VIDEO_TOKENS + REF_TOKENS), lengths


def attention_tma(dtype, head_dim, mask, BLOCK_M, BLOCK_N, WARP_SPECIALIZE, context=False, key_len=False):
    """``_attention_fwd_tma`` as ``kernels.attention`` launches it for the joint video+reference(+text)
    attention."""
    from .joint_attention import kernel as attn

    n, offsets, lengths = _streams(context, key_len)
    t = _qkv(dtype, n, head_dim=head_dim)
    args, meta = attn.launch_args(t, t, t, t, q_offsets=offsets, k_offsets=offsets, key_lengths=lengths, mask=mask,
                                  tokens_per_frame=TOKENS_PER_FRAME, proto_tokens=REF_TOKENS // 3,
                                  block_m=BLOCK_M, block_n=BLOCK_N)
    return attn._attention_fwd_tma, args, meta | dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, WARP_SPECIALIZE=WARP_SPECIALIZE)


def attention_pointers(dtype, head_dim, mask, BLOCK_M, BLOCK_N, context=False, key_len=False):
    """``_attention_fwd`` (raw pointers and strides: the TensorRT plugin's and the AOT library's entry, and
    ``kernels.attention`` before Hopper)."""
    from .joint_attention import kernel as attn

    n, offsets, lengths = _streams(context, key_len)
    t = _qkv(dtype, n, head_dim=head_dim)
    args = (t, t, t, t, attn._key_len(lengths), *t.stride()[:3], *t.stride()[:3], *t.stride()[:3],
            *t.stride()[:3], HEADS, n, n, *offsets, *offsets, TOKENS_PER_FRAME, REF_TOKENS // 3)
    return attn._attention_fwd, args, attn._meta(t, mask, key_len) | dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)


def _quantized_operands(dtype, n, head_dim, pv, block_m, block_n, heads=HEADS):
    """Empty int8 Q/K with their block scales, the V operand of ``pv`` and its scales, the output: what
    ``kernels.quantized_attention`` hands its kernel for a [B=1, n, heads, head_dim] problem."""
    import torch

    from .quantized_attention.kernel import key_block
    from .quantized_attention.reference import QuantizedQK

    def blocks(b):
        return torch.empty(1, heads, -(-n // b))

    codes = torch.empty(1, n, heads, head_dim, dtype=torch.int8)
    block_k = key_block(block_n)
    quantized = QuantizedQK(codes, blocks(block_m), codes, blocks(block_k), torch.empty(1, heads, head_dim),
                            block_m, block_k)
    if pv == "fp8":  # V^T padded to the key tile
        v = torch.empty(1, heads, head_dim, -(-n // block_n) * block_n, dtype=torch.float8_e4m3fn)
    else:
        v = _qkv(dtype, n, heads, head_dim)
    return quantized, v, torch.empty(1, heads, head_dim), _qkv(dtype, n, heads, head_dim)


def quantized_tma(dtype, head_dim, mask, pv, BLOCK_M, BLOCK_N, context=False, key_len=False):
    """``_quantized_fwd_tma`` as ``kernels.quantized_attention`` launches it (sm_90) for the joint
    video+reference(+text) attention."""
    from .quantized_attention import kernel as qattn

    n, offsets, lengths = _streams(context, key_len)
    quantized, v, v_scale, out = _quantized_operands(dtype, n, head_dim, pv, BLOCK_M, BLOCK_N)
    args, meta = qattn.launch_args(quantized, v, v_scale, out, q_offsets=offsets, k_offsets=offsets,
                                   key_lengths=lengths, mask=mask, tokens_per_frame=TOKENS_PER_FRAME,
                                   proto_tokens=REF_TOKENS // 3, pv=pv, block_n=BLOCK_N)
    return qattn._quantized_fwd_tma, args, meta


def quantized_pointers(dtype, head_dim, mask, pv, BLOCK_M, BLOCK_N, context=False, key_len=False):
    """``_quantized_fwd`` (pointers: what ``kernels.quantized_attention`` launches before Hopper)."""
    from .quantized_attention import kernel as qattn

    n, offsets, lengths = _streams(context, key_len)
    quantized, v, v_scale, out = _quantized_operands(dtype, n, head_dim, pv, BLOCK_M, BLOCK_N)
    args, meta = qattn.pointer_args(quantized, v, v_scale, out, q_offsets=offsets, k_offsets=offsets,
                                    key_lengths=lengths, mask=mask, tokens_per_frame=TOKENS_PER_FRAME,
                                    proto_tokens=REF_TOKENS // 3, pv=pv, block_n=BLOCK_N)
    return qattn._quantized_fwd, args, meta


def quantizer(kernel, dtype, heads, smooth=False):
    """The quantisation kernels of the 8-bit attention on a Wan video stream of ``heads`` heads of 128, in blocks of
    the sm_90 kernel's key tile."""
    import torch

    from .quantized_attention import DEFAULT_BLOCKS, quantize

    n, block = VIDEO_TOKENS + REF_TOKENS, DEFAULT_BLOCKS[1]
    x = _qkv(dtype, n, heads)
    partial = torch.empty(heads, quantize.SPLITS, 128)
    if kernel == "_column_stats":
        return quantize._column_stats, (x, partial, n, 1024, heads, x.stride(0), x.stride(1)), dict(
            HEAD_DIM=128, SPLITS=quantize.SPLITS, ROWS=quantize.STATS_ROWS, ABSMAX=not smooth, num_warps=4)
    scale = torch.empty(1, heads, -(-n // block))
    if kernel == "_quantize_int8":
        codes = torch.empty(1, n, heads, 128, dtype=torch.int8)
        return quantize._quantize_int8, (x, partial, codes, scale, torch.empty(1, heads, 128), n, heads,
                                         scale.shape[-1], x.stride(0), x.stride(1), codes.stride(0),
                                         codes.stride(1)), dict(HEAD_DIM=128, BLOCK=block, SPLITS=quantize.SPLITS,
                                                                SMOOTH=smooth, num_warps=quantize.block_warps(block, 128))
    v_t = torch.empty(1, heads, 128, -(-n // block) * block, dtype=torch.float8_e4m3fn)
    return quantize._quantize_v_fp8, (x, partial, v_t, torch.empty(1, heads, 128), n, heads, x.stride(0),
                                      x.stride(1), v_t.stride(2)), dict(HEAD_DIM=128, BLOCK=block,
                                                                        SPLITS=quantize.SPLITS, EMULATE_FP8=False,
                                                                        num_warps=quantize.block_warps(block, 128))


def prologue(dtype, heads, norm="across_heads", rope_axes=None):
    """``_qk_prologue_fwd`` with RMSNorm (``norm``) and key scales, for a video stream of ``heads`` heads of 128
    (RoPE bands ``rope_axes``; None: Wan's)."""
    import torch

    from .qk_prologue import kernel as pro

    q = _qkv(dtype, VIDEO_TOKENS, heads)
    pos = torch.zeros(VIDEO_TOKENS, 3, dtype=torch.int32)
    w = torch.ones(heads * 128 if norm == "across_heads" else 128)
    _, args, meta = pro.launch_args(q, q, pos, pos, q, q, weight_q=w, weight_k=w, q_scale=0.1,
                                    key_scale=torch.ones(VIDEO_TOKENS), norm=norm, rope_axes=rope_axes)
    return pro._qk_prologue_fwd, args, meta


def batch_invariant_linear(dtype, n, k, major):
    """``_batch_invariant_linear_fwd`` with a bias, as ``kernels.batch_invariant_linear`` launches it on a GPU of
    compute capability ``major``.x (its ``tile_config``) for the video + reference tokens; M is not specialised
    on, so every M compiles to this binary."""
    import torch

    from .batch_invariant import kernel as bil

    t, m = _torch_dtype(dtype), VIDEO_TOKENS + REF_TOKENS
    x, w, out = torch.empty(m, k, dtype=t), torch.empty(n, k, dtype=t), torch.empty(m, n, dtype=t)
    args, meta = bil.launch_args(x, w, torch.empty(n, dtype=t), out, bil.tile_config(t, major))
    del meta["num_warps"], meta["num_stages"]  # the variant's
    return bil._batch_invariant_linear_fwd, args, meta


def tutorial(path, BLOCK_M, BLOCK_N):
    """Triton's tutorial ``_attn_fwd_tma`` (non-causal: STAGE 1), fp16, head_dim 128, Z=1, H=12, N_CTX 37440,
    from a copy of the tutorial file the user supplies (its kernels only are loaded, undecorated of autotune)."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    fn = _load_tutorial(path)
    n = VIDEO_TOKENS + REF_TOKENS
    t = torch.empty(HEADS * n, 128, dtype=torch.float16)  # the tutorial's P is fp16: it compiles for fp16 only
    desc_m = TensorDescriptor.from_tensor(t, [BLOCK_M, 128])
    desc_n = TensorDescriptor.from_tensor(t, [BLOCK_N, 128])
    m = torch.empty(HEADS * n, dtype=torch.float32)
    args = (0.088, m, 1, HEADS, desc_m, desc_n, desc_n, desc_m)
    # the tutorial's inner loop takes N_CTX as a constexpr: it is compiled for the sequence length
    return fn, args, dict(N_CTX=n, HEAD_DIM=128, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, FP8_OUTPUT=False, STAGE=1)


def _load_tutorial(path):
    """The tutorial's ``@triton.jit`` functions, re-emitted with ``@triton.jit`` alone into a module of their own
    (the tutorial module itself queries the active GPU at import)."""
    import ast
    import importlib.util

    tree = ast.parse(open(path).read())
    keep = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            node.decorator_list = [ast.parse("triton.jit").body[0].value]
            keep.append(ast.unparse(node))
    source = "import triton\nimport triton.language as tl\n\n\n" + "\n\n\n".join(keep) + "\n"
    module_path = os.path.join(tempfile.mkdtemp(prefix="mvgen-tutorial-"), "tutorial_attention.py")
    with open(module_path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("tutorial_attention", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._attn_fwd_tma


# ---- the variants ----------------------------------------------------------------------------------------
def _attention_variants(archs) -> list[tuple[Variant, int]]:
    from .joint_attention import kernel as attn

    def streams_label(context, key_len):
        return (" 3-stream" if context else "") + (" keylen" if key_len else "")

    def tma(dtype, head_dim, mask, m, n, warps, stages, ws, context=False, key_len=False):
        label = f"{dtype} d{head_dim} {mask} {m}x{n}{' ws' if ws else ''}{streams_label(context, key_len)}"
        return Variant("_attention_fwd_tma", label, "kernels.compile_check:attention_tma",
                       dict(dtype=dtype, head_dim=head_dim, mask=mask, BLOCK_M=m, BLOCK_N=n, WARP_SPECIALIZE=ws,
                            context=context, key_len=key_len), warps, stages)

    def kept(head_dim, ieee, major, mask="full"):
        return [c for c in attn.AUTOTUNE_CONFIGS if attn.config_fits(c[0], c[1], c[4], head_dim=head_dim, ieee=ieee,
                                                                     n_q=1 << 20, major=major, mask=mask, warps=c[2])]

    def pointers(dtype, head_dim, mask, major, arch, context=False, key_len=False):
        bm, bn, w, st = attn.POINTER_CONFIGS[(major, head_dim)]
        return (Variant("_attention_fwd", f"{dtype} d{head_dim} {mask} {bm}x{bn} ptr{streams_label(context, key_len)}",
                        "kernels.compile_check:attention_pointers",
                        dict(dtype=dtype, head_dim=head_dim, mask=mask, BLOCK_M=bm, BLOCK_N=bn, context=context,
                             key_len=key_len), w, st), arch)

    out = []
    for arch in archs:
        major = min(arch // 10, 9)
        if major >= 9:  # the descriptor entry: what kernels.attention launches on Hopper and newer
            for m, n, w, s, ws in kept(128, False, major):  # every config the autotuner may pick, bf16 d128
                out.append((tma("bf16", 128, "full", m, n, w, s, ws), arch))
            m, n, w, s, ws = kept(128, False, major)[0]
            out.append((tma("bf16", 128, "isolated", m, n, w, s, ws), arch))
            # HunyuanVideo: [video | reference | text] streams, the text's padding masked by key lengths. Offsets
            # are runtime integers: without key lengths a three-stream launch is the binary of the row above
            out.append((tma("bf16", 128, "full", m, n, w, s, ws, context=True, key_len=True), arch))
            out.append((tma("bf16", 128, "isolated", m, n, w, s, ws, context=True, key_len=True), arch))
            out += [(tma("bf16", 128, "prototype", *c), arch) for c in kept(128, False, major, "prototype")[:2]]
            out.append((tma("fp16", 128, "full", m, n, w, s, ws), arch))
            out.append((tma("bf16", 64, "full", *kept(64, False, major)[0]), arch))
            out.append((tma("fp32", 64, "prototype", *kept(64, True, major, "prototype")[0]), arch))
            if (128, 64, 8, 3, False) not in kept(128, False, major):
                out.append((tma("bf16", 128, "full", 128, 64, 8, 3, False), arch))
            out.append((tma("fp16", 128, "full", 128, 64, 8, 3, False), arch))  # the tutorial comparison's tile
        # the pointer entry: the TensorRT plugin and AOT library everywhere, kernels.attention before Hopper
        out += [pointers(dtype, 128, mask, major, arch) for dtype in ("bf16", "fp16") for mask in ("full", "isolated")]
        out += [pointers("bf16", 128, "prototype", major, arch), pointers("bf16", 64, "full", major, arch)]
        if major < 9:  # key lengths reach the pointer entry only through kernels.attention (the plugin has none)
            out += [pointers("bf16", 128, mask, major, arch, context=True, key_len=True)
                    for mask in ("full", "isolated")]
        for heads in (12, 40):  # Wan 1.3B and 14B
            out.append((Variant("_qk_prologue_fwd", f"bf16 H={heads} d128 norm+scales", "kernels.compile_check:prologue",
                                dict(dtype="bf16", heads=heads), 0, 1), arch))
        # HunyuanVideo 13B: per-head RMSNorm, RoPE bands (16, 56, 56)
        out.append((Variant("_qk_prologue_fwd", f"bf16 H={HUNYUAN_HEADS} d128 per-head norm+scales axes 16/56/56",
                            "kernels.compile_check:prologue",
                            dict(dtype="bf16", heads=HUNYUAN_HEADS, norm="per_head", rope_axes=HUNYUAN_ROPE_AXES),
                            0, 1), arch))
    return out


def _quantized_variants(archs) -> list[tuple[Variant, int]]:
    """The 8-bit attention as launched: the descriptor entry on sm_90 (FP8 P.V), the pointer entry on sm_89 (FP8
    P.V) and sm_80 (16-bit P.V); every mask, both head dims, the three-stream launch with key lengths; then its
    quantisation kernels. One sm_90 row with 16-bit P.V isolates what the FP8 P.V costs in the loop, and one at the
    16-bit kernel's 128x128 tile (not launched: sm_90 takes 128x256) compares the loops tile for tile."""
    from .quantized_attention import kernel as qattn

    out = []
    for arch in archs:
        major = min(arch // 10, 9)
        pv = "fp8" if arch >= 89 else "16bit"
        entry, builder = (("_quantized_fwd_tma", "quantized_tma") if major >= 9
                          else ("_quantized_fwd", "quantized_pointers"))

        def variant(dtype, head_dim, mask, pv=pv, context=False, key_len=False, block_n=None):
            c = qattn.tile_config(major, head_dim, mask, pv)
            bm, bn, warps, stages = c["BLOCK_M"], block_n or c["BLOCK_N"], c["num_warps"], c["num_stages"]
            streams = (" 3-stream" if context else "") + (" keylen" if key_len else "")
            label = f"int8 qk {pv} pv {dtype} d{head_dim} {mask} {bm}x{bn}{streams}"
            return (Variant(entry, label, f"kernels.compile_check:{builder}",
                            dict(dtype=dtype, head_dim=head_dim, mask=mask, pv=pv, BLOCK_M=bm, BLOCK_N=bn,
                                 context=context, key_len=key_len), warps, stages), arch)

        out += [variant("bf16", 128, mask) for mask in ("full", "isolated", "prototype")]
        out += [variant("bf16", 128, mask, context=True, key_len=True) for mask in ("full", "isolated")]
        out += [variant("bf16", 64, "full"), variant("fp16", 128, "full")]
        if pv == "fp8":
            out.append(variant("bf16", 128, "full", pv="16bit"))
        if major >= 9:
            out.append(variant("bf16", 128, "full", block_n=qattn.NARROW_BLOCK_N))
        for kernel, smooth in (("_column_stats", True), ("_quantize_int8", True), ("_quantize_v_fp8", False)):
            if kernel == "_quantize_v_fp8" and arch < 89:
                continue  # sm_80 has no FP8: its P.V stays 16-bit and V is not quantised
            out.append((Variant(kernel, f"bf16 H=40 d128{' smooth' if smooth else ''}", "kernels.compile_check:quantizer",
                                dict(kernel=kernel, dtype="bf16", heads=40, smooth=smooth), 0, 1), arch))
    return out


def _signature_variants(archs) -> list[tuple[Variant, int]]:
    from .fusions.kernel import block_and_warps
    from .prototype.kernel import GPU_CONFIG, GPU_CONFIG_FP32

    specs = []
    for dtype, config in (("bf16", GPU_CONFIG), ("fp32", GPU_CONFIG_FP32)):
        common = dict(BLOCK_D=64, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", EMULATE_BF16=False)
        ptr = dict(Q=f"*{dtype}", K=f"*{dtype}")
        specs.append(("kernels.prototype.kernel:_ppa_row_stats", f"{dtype} d64", ptr | dict(Lse="*fp32"),
                      common | dict(BLOCK_Q=config["BLOCK_Q"], BLOCK_K=config["BLOCK_T"]), ("qk_scale",),
                      config["num_warps"], config["num_stages"]))
        specs.append(("kernels.prototype.kernel:_ppa_columns", f"{dtype} d64",
                      ptr | dict(Z=f"*{dtype}", Lse="*fp32", Scores="*fp32", Proto=f"*{dtype}"),
                      common | {k: config[k] for k in ("BLOCK_Q", "BLOCK_T", "BLOCK_C")}, ("qk_scale", "inv_n_q"),
                      config["num_warps"], config["num_stages"]))
    fusions = {
        "_adaln_layernorm_fwd": ("X", "Shift", "Scale", "Out"),
        "_gated_residual_fwd": ("X", "Y", "Gate", "Out"),
        "_distribution_fusion_fwd": ("A", "B", "Out"),
    }
    for channels in (1536, 5120):  # Wan 1.3B and 14B hidden sizes
        block, warps = block_and_warps(channels)
        for name, pointers in fusions.items():
            specs.append((f"kernels.fusions.kernel:{name}", f"bf16 C={channels}",
                          {p: "*fp32" if p in ("Shift", "Scale", "Gate") else "*bf16" for p in pointers},
                          dict(BLOCK_C=block, EMULATE_BF16=False), ("eps",), warps, 1))
    return [(Variant(spec.split(":")[1], label, None,
                     dict(kernel=spec, pointers=pointers, constexprs=consts, floats=floats), warps, stages), arch)
            for arch in archs for spec, label, pointers, consts, floats, warps, stages in specs]


def _linear_variants(archs) -> list[tuple[Variant, int]]:
    """The batch-invariant linear at Wan 14B's shapes: K = 5120, N = 5120 (projections) or 13824 (the FFN). M, N
    and K are runtime integers: both N compile to one binary (after N = 5120, N = 13824 hits the JIT cache)."""
    from .batch_invariant.kernel import tile_config

    out = []
    for arch in archs:
        for dtype in ("bf16", "fp32"):
            c = tile_config(_torch_dtype(dtype), arch // 10)
            out.append((Variant("_batch_invariant_linear_fwd",
                                f"{dtype} N=5120/13824 K=5120 bias {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}",
                                "kernels.compile_check:batch_invariant_linear",
                                dict(dtype=dtype, n=5120, k=5120, major=arch // 10), c["num_warps"],
                                c["num_stages"]), arch))
    return out


def jobs(archs, tutorial_path: str | None = None) -> list[tuple[Variant, int]]:
    out = (_attention_variants(archs) + _quantized_variants(archs) + _signature_variants(archs)
           + _linear_variants(archs))
    if tutorial_path:
        out.append((Variant("tutorial _attn_fwd_tma", "fp16 d128 non-causal 128x64", "kernels.compile_check:tutorial",
                            dict(path=tutorial_path, BLOCK_M=128, BLOCK_N=64), 8, 3), archs[0]))
    return out


# ---- compiling -------------------------------------------------------------------------------------------
class _CompileOnlyDriver:
    """What ``JITFunction.warmup`` asks of the active driver, for a target and no GPU: the target, a device
    index, the CUDA type mapping. Launching is impossible, and warmup never launches."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import ty_to_cpp

        self.target = GPUTarget("cuda", arch, 32)
        self.map_python_to_cpp_type = ty_to_cpp

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # the JIT keeps compiled kernels per device: one "device" per target, or sm_80 would reuse sm_90's
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compile_only(arch: int):
    import triton

    previous = triton.runtime.driver._active
    triton.runtime.driver.set_active(_CompileOnlyDriver(arch))
    try:
        yield
    finally:
        triton.runtime.driver._active = previous


def _load(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _compile_by_signature(v: Variant, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    p = v.params
    fn = _load(p["kernel"])
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in p["constexprs"]:
            sig[name] = "constexpr"
        elif name in p["pointers"]:
            sig[name] = p["pointers"][name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # every tensor a launcher passes is 16-byte aligned
        else:
            sig[name] = "fp32" if name in p["floats"] else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=p["constexprs"], attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=v.num_warps, num_stages=v.num_stages))


def _compile(v: Variant, arch: int):
    if v.builder is None:
        return _compile_by_signature(v, arch)
    with compile_only(arch):
        fn, args, meta = _load(v.builder)(**v.params)
        options = {} if v.num_warps == 0 else dict(num_warps=v.num_warps)  # 0: the builder's meta has them
        return fn.warmup(*args, grid=(1,), **meta, **options, num_stages=v.num_stages)


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}
_INSTRUCTION = re.compile(r"/\*[0-9a-f]+\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([.A-Z0-9_]*)")
_LABEL = re.compile(r"^\s*(\.L_[\w]+):")
_BRANCH_TARGET = re.compile(r"BRA\s+`?\(?(\.L_[\w]+)")
# tensor-core SASS: 16-bit (HGMMA on sm_90, HMMA before), integer (IGMMA on sm_90, IMMA before), FP8 (QGMMA on
# sm_90, QMMA on sm_89)
_MMA = ("HGMMA", "HMMA", "WGMMA", "IGMMA", "IMMA", "QGMMA", "QMMA")


def sass(cubin: bytes) -> str:
    from triton.backends import nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout


def hot_loop(disassembly: str) -> dict | None:
    """The hot loop: of the innermost loops (a backward branch to a label whose span holds no other such
    span) holding the most tensor-core instructions, the shortest (the unmasked key range, where the
    attention spends its time). Out-of-line stubs (barrier waits) branch back over the whole kernel and are
    never innermost. Returns
    its instruction count, MUFU operations and sin/cos among them, and how many loops hold MMAs at all."""
    labels, body = {}, []  # body: (opcode, modifiers, branch target or None)
    for line in disassembly.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(body)
            continue
        ins = _INSTRUCTION.search(line)
        if ins:
            _, op, mod = ins.groups()
            target = _BRANCH_TARGET.search(line) if op == "BRA" else None
            body.append((op, mod, target.group(1) if target else None))
    edges = [(labels[t], end) for end, (_, _, t) in enumerate(body) if t in labels and labels[t] <= end]
    loops = []
    for start, end in edges:
        if any(start <= s2 and e2 <= end and (s2, e2) != (start, end) for s2, e2 in edges):
            continue  # not innermost (out-of-line stubs jump back over the whole kernel, too)
        ops = body[start:end + 1]
        mma = sum(op in _MMA for op, _, _ in ops)
        if mma:
            families = {}
            for op, mod, _ in ops:
                if op in _MMA:
                    families[op] = families.get(op, 0) + 1
            loops.append(dict(sass=len(ops), mma=mma, families=families, mufu=sum(op == "MUFU" for op, _, _ in ops),
                              trig=sum(op == "MUFU" and (mod.startswith(".SIN") or mod.startswith(".COS"))
                                       for op, mod, _ in ops)))
    if not loops:
        return None
    best = max(loops, key=lambda lp: (lp["mma"], -lp["sass"]))
    return best | dict(loops=len(loops))


def compile_variant(v: Variant, arch: int) -> Result:
    """Compile one variant for ``sm_<arch>``; never raises (failures are reported in the result)."""
    result = Result(v.kernel, v.label, arch, v.num_warps, v.num_stages, ok=False)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = _compile(v, arch)
    except Exception as exc:  # a compile error of one variant is a result, not a crash of the check
        text = str(exc).strip()
        result.error = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
        result.seconds = time.perf_counter() - start
        return result
    result.ok = True
    result.seconds = time.perf_counter() - start
    result.shared = compiled.metadata.shared
    result.num_warps = compiled.metadata.num_warps
    text = log.getvalue()
    for key, pattern in _PTXAS.items():
        found = pattern.findall(text)
        setattr(result, key, int(found[-1]) if found else None)
    ptx = compiled.asm.get("ptx", "")
    result.mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "")
    loop = hot_loop(sass(compiled.asm["cubin"]))
    if loop is not None:
        keys = v.params.get("BLOCK_N")
        result.loop_mma = " ".join(f"{kind}:{n}" for kind, n in sorted(loop["families"].items()))
        result.loop_sass, result.loop_mufu, result.loop_trig, result.loops = (loop["sass"], loop["mufu"],
                                                                              loop["trig"], loop["loops"])
        if keys:
            result.loop_keys = keys
            result.sass_per_64 = round(loop["sass"] * 64 / keys, 1)
    return result


def _init_worker(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def probe() -> str | None:
    """None if the CUDA backend compiles a trivial kernel here, else the reason it cannot."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception as exc:
        return f"triton does not import: {exc}"
    if "nvidia" not in backends:
        return f"triton has no CUDA backend (backends: {sorted(backends)})"
    v = Variant("_distribution_fusion_fwd", "probe", None,
                dict(kernel="kernels.fusions.kernel:_distribution_fusion_fwd",
                     pointers={"A": "*fp32", "B": "*fp32", "Out": "*fp32"},
                     constexprs=dict(BLOCK_C=64, EMULATE_BF16=False), floats=("eps",)), 1, 1)
    result = compile_variant(v, 80)
    return None if result.ok else f"a trivial kernel does not compile: {result.error}"


def _cell(value) -> str:
    return "" if value is None else str(value)


def table(results: list[Result]) -> str:
    header = ["kernel", "variant", "arch", "warps", "stages", "regs", "spill st/ld (B)", "stack (B)", "smem (B)",
              "mma", "loop MMAs", "loop SASS", "per 64 keys", "loop MUFU", "sin/cos", "s", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        spills = "" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        lines.append("| " + " | ".join([
            r.kernel, r.label, f"sm_{r.arch}", str(r.num_warps), str(r.num_stages), _cell(r.registers), spills,
            _cell(r.stack), _cell(r.shared), r.mma, r.loop_mma, _cell(r.loop_sass), _cell(r.sass_per_64), _cell(r.loop_mufu),
            _cell(r.loop_trig), f"{r.seconds:.1f}", "ok" if r.ok else f"FAILED {r.error}"]) + " |")
    return "\n".join(lines)


def _row(results: list[Result], kernel: str, label: str, arch: int = 90) -> Result | None:
    return next((r for r in results if r.kernel.startswith(kernel) and r.label.startswith(label) and r.arch == arch
                 and r.sass_per_64), None)


def comparison(results: list[Result]) -> str:
    """The tutorial line: our 128x64 full-mask loop against the tutorial's, both sm_90 as launched; the 8-bit line:
    the 8-bit loop at its launched tile against the 16-bit one at 128x128 (its fewest per 64 keys)."""
    lines = []
    ours, theirs = _row(results, "_attention_fwd_tma", "fp16 d128 full 128x64"), _row(results, "tutorial", "")
    if ours and theirs:
        lines.append(f"attention loop, sm_90 fp16 d128, 128x64 tile, SASS per warp per K tile: mvgen "
                     f"{ours.sass_per_64:g}, tutorial {theirs.sass_per_64:g}, ratio "
                     f"{ours.sass_per_64 / theirs.sass_per_64:.2f}")
    eight, sixteen = (_row(results, "_quantized_fwd_tma", "int8 qk fp8 pv bf16 d128 full"),
                      _row(results, "_attention_fwd_tma", "bf16 d128 full 128x128"))
    if eight and sixteen:
        tile = eight.label.split()[-1]
        lines.append(f"8-bit attention loop, sm_90 d128 full, SASS per warp per 64 keys: int8 QK + fp8 PV at "
                     f"{tile} {eight.sass_per_64:g}, bf16 at 128x128 {sixteen.sass_per_64:g}, ratio "
                     f"{eight.sass_per_64 / sixteen.sass_per_64:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--tutorial", help="a copy of Triton's python/tutorials/06-fused-attention.py to compare")
    parser.add_argument("--kernel", nargs="+", help="compile only these kernels (e.g. _batch_invariant_linear_fwd)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mvgen-triton-cache-") as cache:
        _init_worker(cache)
        reason = probe()
        if reason is not None:
            print(f"skipped: {reason}")
            return BACKEND_UNAVAILABLE
        todo = [(v, arch) for v, arch in jobs(args.arch, args.tutorial) if not args.kernel or v.kernel in args.kernel]
        start = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker, initargs=(cache,)) as pool:
            results = list(pool.map(compile_variant, *zip(*todo)))
    text = table(results)
    summary = comparison(results)
    print(text + ("\n\n" + summary if summary else ""))
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)}/{len(results)} variants compiled for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} in {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_payload(results, args.arch), f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + ("\n\n" + summary if summary else "") + "\n")
    return 1 if failed else 0


def _payload(results: list[Result], archs) -> dict:
    """The benchmarks' JSON schema (machine, versions, revision, config, rows); the machine compiled only."""
    import platform

    import triton

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    return {"benchmark": "compile_check",
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "triton": triton.__version__, "device": "none (compiled for the target, not run)"},
            "revision": rev,
            "config": {"archs": list(archs), "video_tokens": VIDEO_TOKENS, "reference_tokens": REF_TOKENS,
                       "heads": HEADS, "tokens_per_frame": TOKENS_PER_FRAME},
            "rows": [asdict(r) for r in results]}


if __name__ == "__main__":
    sys.exit(main())
