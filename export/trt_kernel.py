"""The joint-attention Triton kernel in the launch convention of TensorRT AOT plugins and Triton's AOT tools.

TensorRT's quickly-deployable AOT plugins call a kernel as ``(input pointers..., extra int32 scalars...,
output pointers...)``; ``joint_attention_plugin_kernel`` is that entry point for the ``mvgen.JointAttention``
node (see ``export/plugin.py``): inputs q, k, v (rotated and scaled by the QK prologue in the graph), n_video;
scalars n_tokens, n_heads, batch (``batch`` only sizes the grid); output out; grid (cdiv(n_tokens, BLOCK_M),
batch * n_heads). It only derives strides of contiguous [B, N, H, D] tensors, reads ``n_video`` from device
memory and calls ``kernels.joint_attention.kernel._attention_fwd`` (the pointer entry of the kernel the engine
launches) with the streams [video | reference] at offsets (n_video, n_tokens) for queries and keys and no key
lengths, so the plugin and the PyTorch path share one loop body. The same entry point is what
``CMakeLists.txt`` compiles with ``triton.tools.compile`` into C launchers + cubins, with 16-byte aligned
pointers (``:16``), as ``compile_plugin_kernel`` compiles it for the TensorRT plugin.

The tiles need more than the default 48 KiB of shared memory (128x64 tiles, 3 stages: ~128 KiB at head_dim
128): Triton's AOT loader opts the function in (``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES``), and the
TensorRT plugin hands the size to ``KernelLaunchParams.shared_mem``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.joint_attention import EXPORTED_MASKS, MASK_IDS
from kernels.joint_attention.kernel import POINTER_CONFIG_FP32, POINTER_CONFIGS, _attention_fwd

TRITON_TYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def launch_config(dtype: str, head_dim: int, arch: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the plugin entry for a dtype, head dim and ``sm_<arch>``
    (Blackwell and newer take Hopper's tiles)."""
    head_dims = sorted({d for _, d in POINTER_CONFIGS})
    if head_dim not in head_dims:
        raise ValueError(f"the plugin kernel supports head_dim {head_dims}, got {head_dim}")
    return POINTER_CONFIG_FP32 if dtype == "fp32" else POINTER_CONFIGS[(min(arch // 10, 9), head_dim)]


@triton.jit
def joint_attention_plugin_kernel(
    Q, K, V, NVideo, n_tokens, n_heads, batch, Out,
    HEAD_DIM: tl.constexpr, MASK_MODE: tl.constexpr, IEEE_DOT: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n_video = tl.load(NVideo).to(tl.int32)
    stride_n = n_heads * HEAD_DIM
    stride_b = n_tokens * stride_n
    if IEEE_DOT:
        _attention_fwd(Q, K, V, Out, None, stride_b, stride_n, HEAD_DIM, stride_b, stride_n, HEAD_DIM,
                       stride_b, stride_n, HEAD_DIM, stride_b, stride_n, HEAD_DIM,
                       n_heads, n_tokens, n_tokens, n_video, n_tokens, n_video, n_tokens, 1, 1,
                       HEAD_DIM, MASK_MODE, False, "ieee", EMULATE_BF16, BLOCK_M, BLOCK_N)
    else:
        _attention_fwd(Q, K, V, Out, None, stride_b, stride_n, HEAD_DIM, stride_b, stride_n, HEAD_DIM,
                       stride_b, stride_n, HEAD_DIM, stride_b, stride_n, HEAD_DIM,
                       n_heads, n_tokens, n_tokens, n_video, n_tokens, n_video, n_tokens, 1, 1,
                       HEAD_DIM, MASK_MODE, False, "tf32", EMULATE_BF16, BLOCK_M, BLOCK_N)


def plugin_constexprs(dtype: str, head_dim: int, mask: str, arch: int = 90, emulate_bf16: bool = False) -> dict:
    """Compile-time arguments of ``joint_attention_plugin_kernel`` for one specialisation."""
    if mask not in EXPORTED_MASKS:
        raise ValueError(f"the plugin kernel supports masks {EXPORTED_MASKS}, got {mask!r}")
    block_m, block_n, _, _ = launch_config(dtype, head_dim, arch)
    return dict(HEAD_DIM=head_dim, MASK_MODE=MASK_IDS[mask], IEEE_DOT=dtype == "fp32", EMULATE_BF16=emulate_bf16,
                BLOCK_M=block_m, BLOCK_N=block_n)


def plugin_signature(dtype: str) -> dict[str, str]:
    t = TRITON_TYPES[dtype]
    return {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "NVideo": "*i64", "n_tokens": "i32", "n_heads": "i32",
            "batch": "i32", "Out": f"*{t}"}


def compile_plugin_kernel(dtype: str, head_dim: int, mask: str, arch: int):
    """``triton.compile`` of one specialisation for ``sm_<arch>`` (no GPU needed), as launched: every pointer
    16-byte aligned (``tt.divisibility``), as TensorRT's allocations and the AOT signature's ``:16`` are."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = plugin_constexprs(dtype, head_dim, mask, arch)
    signature = {**plugin_signature(dtype), **{name: "constexpr" for name in constexprs}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(signature.values()) if ty.startswith("*")}
    _, _, warps, stages = launch_config(dtype, head_dim, arch)
    source = ASTSource(fn=joint_attention_plugin_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages})


def aot_signature(dtype: str, head_dim: int, mask: str, arch: int) -> str:
    """The ``--signature`` string of ``python -m triton.tools.compile`` for one specialisation."""
    constexprs = plugin_constexprs(dtype, head_dim, mask, arch)
    pointers = [f"{v}:16" if v.startswith("*") else v for v in plugin_signature(dtype).values()]
    values = [str(int(v)) if isinstance(v, bool) else repr(v) for v in constexprs.values()]
    return ", ".join(pointers + values)
