"""The joint-attention Triton kernel in the launch convention of TensorRT AOT plugins and Triton's AOT tools.

TensorRT's quickly-deployable AOT plugins call a kernel as ``(input pointers..., extra int32 scalars...,
output pointers...)``; ``joint_attention_plugin_kernel`` is that entry point for the ``mvgen.JointAttention``
node (see ``export/plugin.py``): inputs q, k, v, pos, key_scale, n_video, inv_freq; scalars n_tokens,
n_heads, batch (``batch`` only sizes the grid); output out; grid (cdiv(n_tokens, BLOCK_M), batch * n_heads).
It only derives strides of contiguous [B, N, H, D] tensors, reads ``n_video`` from device memory and calls
``kernels.joint_attention.kernel._joint_attention_fwd`` (the same kernel the engine launches), so the plugin and the
PyTorch path share one implementation. The same entry point is what ``CMakeLists.txt`` compiles with
``triton.tools.compile`` into C launchers + cubins.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from kernels.joint_attention.kernel import MASK_IDS, _joint_attention_fwd
from kernels.rope import rope_bands

_LOG2E = 1.4426950408889634
# one launch configuration per head dim (BLOCK_M, BLOCK_N, num_warps, num_stages): entries of the kernel's
# autotune list that fit sm_80 and sm_90 in 48 KiB of shared memory for fp16/bf16; fp32 takes smaller tiles
PLUGIN_CONFIGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 2)}
FP32_CONFIG = (64, 32, 4, 2)


def launch_config(dtype: str, head_dim: int) -> tuple[int, int, int, int]:
    if head_dim not in PLUGIN_CONFIGS:
        raise ValueError(f"the plugin kernel supports head_dim {sorted(PLUGIN_CONFIGS)}, got {head_dim}")
    return FP32_CONFIG if dtype == "fp32" else PLUGIN_CONFIGS[head_dim]
TRITON_TYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


@triton.jit
def joint_attention_plugin_kernel(
    Q, K, V, Pos, KeyScale, NVideo, InvFreq, n_tokens, n_heads, batch, Out,
    HEAD_DIM: tl.constexpr, T_PAIRS: tl.constexpr, H_PAIRS: tl.constexpr, MASK_MODE: tl.constexpr,
    QK_SCALE_NANO: tl.constexpr, FAST_TRIG: tl.constexpr, IEEE_DOT: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # QK_SCALE_NANO: softmax scale * log2(e) in units of 1e-9 (an integer, so AOT entry-point names stay C
    # identifiers; 1e-9 is far below fp32 resolution of a scale near 0.1)
    n_video = tl.load(NVideo).to(tl.int32)
    stride_n = n_heads * HEAD_DIM
    stride_b = n_tokens * stride_n
    if IEEE_DOT:
        _joint_attention_fwd(Q, K, V, Out, Pos, Pos, KeyScale, InvFreq,
                             stride_b, stride_n, HEAD_DIM, stride_b, stride_n, HEAD_DIM,
                             stride_b, stride_n, HEAD_DIM, stride_b, stride_n, HEAD_DIM,
                             n_heads, n_tokens, n_tokens, n_video, n_video, 1, 1, QK_SCALE_NANO * 1e-9,
                             HEAD_DIM, T_PAIRS, H_PAIRS, MASK_MODE, True, FAST_TRIG, "ieee", EMULATE_BF16,
                             BLOCK_M, BLOCK_N)
    else:
        _joint_attention_fwd(Q, K, V, Out, Pos, Pos, KeyScale, InvFreq,
                             stride_b, stride_n, HEAD_DIM, stride_b, stride_n, HEAD_DIM,
                             stride_b, stride_n, HEAD_DIM, stride_b, stride_n, HEAD_DIM,
                             n_heads, n_tokens, n_tokens, n_video, n_video, 1, 1, QK_SCALE_NANO * 1e-9,
                             HEAD_DIM, T_PAIRS, H_PAIRS, MASK_MODE, True, FAST_TRIG, "tf32", EMULATE_BF16,
                             BLOCK_M, BLOCK_N)


def plugin_constexprs(dtype: str, head_dim: int, mask: str, sm_scale: float = 0.0, emulate_bf16: bool = False,
                      fast_trig: bool | None = None) -> dict:
    """Compile-time arguments of ``joint_attention_plugin_kernel`` for one specialisation."""
    if mask not in ("full", "isolated"):
        raise ValueError(f"the plugin kernel supports masks ('full', 'isolated'), got {mask!r}")
    t_band, h_band, _ = rope_bands(head_dim)
    block_m, block_n, _, _ = launch_config(dtype, head_dim)
    return dict(
        HEAD_DIM=head_dim, T_PAIRS=t_band // 2, H_PAIRS=h_band // 2, MASK_MODE=MASK_IDS[mask],
        QK_SCALE_NANO=round((sm_scale or 1.0 / math.sqrt(head_dim)) * _LOG2E * 1e9),
        FAST_TRIG=(dtype != "fp32") if fast_trig is None else fast_trig, IEEE_DOT=dtype == "fp32",
        EMULATE_BF16=emulate_bf16, BLOCK_M=block_m, BLOCK_N=block_n,
    )


def plugin_signature(dtype: str) -> dict[str, str]:
    t = TRITON_TYPES[dtype]
    return {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "Pos": "*i64", "KeyScale": "*fp32", "NVideo": "*i64",
            "InvFreq": "*fp32", "n_tokens": "i32", "n_heads": "i32", "batch": "i32", "Out": f"*{t}"}


def compile_plugin_kernel(dtype: str, head_dim: int, mask: str, arch: int, sm_scale: float = 0.0):
    """``triton.compile`` of one specialisation for ``sm_<arch>`` (no GPU needed); returns the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = plugin_constexprs(dtype, head_dim, mask, sm_scale)
    signature = {**plugin_signature(dtype), **{name: "constexpr" for name in constexprs}}
    _, _, warps, stages = launch_config(dtype, head_dim)
    source = ASTSource(fn=joint_attention_plugin_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages})


def aot_signature(dtype: str, head_dim: int, mask: str) -> str:
    """The ``--signature`` string of ``python -m triton.tools.compile`` for one specialisation."""
    constexprs = plugin_constexprs(dtype, head_dim, mask)
    pointers = [f"{v}:16" if v.startswith("*") else v for v in plugin_signature(dtype).values()]
    values = [str(int(v)) if isinstance(v, bool) else repr(v) for v in constexprs.values()]
    return ", ".join(pointers + values)
