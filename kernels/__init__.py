"""Custom kernels for mvgen. Each kernel has a PyTorch reference beside it (the CPU path and the oracle).

Every op here is a dispatch point with a ``backend`` switch:
  ``"auto"``      the Triton kernel for CUDA tensors of a supported dtype/shape, the reference otherwise;
  ``"reference"`` always the PyTorch reference (debugging, ONNX export);
  ``"triton"``    always the kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
The attention has a fourth, ``"sdpa"``: PyTorch's SDPA without a mask (flash/cuDNN kernels on GPU) for the
masks it can express. Kernel modules (and so Triton itself) are imported only when a kernel is launched, so
importing ``kernels`` never needs Triton and ``TRITON_INTERPRET`` can still be set by a test harness beforehand.

The joint self-attention is two steps, ``qk_prologue`` (RMSNorm, RoPE, scales: once per layer over Q and K)
and ``attention`` (on the rotated Q/K); ``joint_attention`` is the pair for callers holding one Q and one K.
The attention's sequences are [video | reference | context] streams given by two offsets each (``q_offsets``,
``k_offsets``; Wan has no context stream), with optional per-row key lengths (padded text in the context).
``attention(..., precision="int8")`` runs ``quantized_attention`` instead: INT8 QK^T and FP8 P.V on the same
prologue outputs (SageAttention's recipe; its quantisation passes run between the prologue and the kernel).
"""
from __future__ import annotations

import math

import torch

from .batch_invariant import batch_invariant_linear_reference
from .batch_invariant.reference import check_linear
from .fusions.reference import adaln_layernorm_reference, distribution_fusion_reference, gated_residual_reference
from .joint_attention import (
    EXPORTED_MASKS,
    MASK_IDS,
    MASK_MODES,
    joint_attention_reference,
    rotated_attention_reference,
    rotated_attention_sdpa,
)
from .prototype.reference import prototype_aggregate_reference
from .qk_prologue import qk_prologue_reference
from .quantized_attention import DEFAULT_BLOCKS, PV_PRECISIONS, default_pv, quantized_attention_reference

BACKENDS = ("auto", "reference", "triton")
ATTENTION_BACKENDS = ("auto", "reference", "sdpa", "triton")
# the attention's arithmetic: 16-bit operands (bf16 or fp16, the model's dtype), or INT8 QK^T with FP8 P.V
# (``kernels.quantized_attention``, SageAttention's recipe); the first is the default
ATTENTION_PRECISIONS = ("bf16", "int8")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ATTENTION_HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634

__all__ = [
    "BACKENDS", "ATTENTION_BACKENDS", "ATTENTION_PRECISIONS", "PV_PRECISIONS", "MASK_MODES", "MASK_IDS", "EXPORTED_MASKS", "qk_prologue", "attention", "attention_path", "kernel_backend",
    "joint_attention", "prototype_aggregate", "adaln_layernorm", "gated_residual", "distribution_fusion",
    "joint_attention_reference", "rotated_attention_reference", "qk_prologue_reference", "quantized_attention",
    "quantized_attention_reference",
    "prototype_aggregate_reference", "adaln_layernorm_reference", "gated_residual_reference",
    "distribution_fusion_reference", "batch_invariant_linear", "batch_invariant_linear_reference",
]


def _use_kernel(backend: str, tensors, supported: bool = True) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return supported and all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in tensors)
    return backend == "triton"


def prologue_rope_table(pos: torch.Tensor, head_dim: int, like: torch.Tensor, theta: float = 10000.0,
                        backend: str = "auto", rope_axes: tuple[int, int, int] | None = None):
    """The (cos, sin) table of ``pos`` that ``qk_prologue`` reuses for every tensor rotated at those positions
    (Q and K of every layer), for Q/K like ``like`` (dtype, device); None where the prologue runs the kernel (it
    computes the angles in registers: a table would only add a read) or the oracle's float64. ``rope_axes``: the
    band sizes (``kernels.rope.rope_bands``), the same the prologue is given."""
    from .rope import rope_table

    if _use_kernel(backend, (like,), head_dim in ATTENTION_HEAD_DIMS) or like.dtype == torch.float64:
        return None
    return rope_table(pos, head_dim, theta, axes=rope_axes)


def qk_prologue(q, k, q_pos, k_pos, *, weight_q=None, weight_k=None, eps=1e-6, q_scale=1.0, key_scale=None,
                theta=10000.0, out_q=None, out_k=None, backend="auto", q_rope=None, k_rope=None, rope_axes=None,
                norm="across_heads"):
    """(Q, K) rotated by RoPE from positions (bands ``rope_axes``, None for Wan's), optionally RMSNorm'd first
    (``weight_q``/``weight_k``: [H*D] across the heads of a token for ``norm="across_heads"``, [D] per head for
    ``"per_head"``), Q times ``q_scale``, key j times ``key_scale[j]``; written to ``out_q``/``out_k`` when given.
    q [B, Nq, H, D] or None (keys only), k [B, Nk, H, D]; see ``qk_prologue_reference``. ``q_rope``/``k_rope``:
    the positions' ``prologue_rope_table`` (the reference path reuses it instead of recomputing the angles)."""
    kw = dict(weight_q=weight_q, weight_k=weight_k, eps=eps, q_scale=q_scale, key_scale=key_scale, theta=theta,
              out_q=out_q, out_k=out_k, rope_axes=rope_axes, norm=norm)
    if _use_kernel(backend, (k,), k.shape[-1] in ATTENTION_HEAD_DIMS):
        from .qk_prologue.kernel import qk_prologue_triton
        if q is None:  # a stream that gives keys only: an empty query block in the same launch
            kw["out_q"] = None if out_q is None else out_q[:, :0]
            return None, qk_prologue_triton(k[:, :0], k, k_pos[:0], k_pos, **kw)[1]
        return qk_prologue_triton(q, k, q_pos, k_pos, **kw)
    return qk_prologue_reference(q, k, q_pos, k_pos, q_rope=q_rope, k_rope=k_rope, **kw)


def attention_path(backend: str, q: torch.Tensor, mask: str, key_lengths: torch.Tensor | None = None) -> str:
    """Which implementation ``attention`` runs: ``auto`` takes SDPA (flash/cuDNN) for the masks it expresses
    without a mask tensor and the Triton kernel for ``prototype`` and for per-row ``key_lengths`` on CUDA
    fp16/bf16 with D in (64, 128); the reference on CPU and for fp32 (the kernel's fp32 path, IEEE products on
    CUDA cores, is an exactness path, not a fast one)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if not q.is_cuda or q.dtype == torch.float32 or q.shape[-1] not in ATTENTION_HEAD_DIMS:
        return "reference"
    return "triton" if mask == "prototype" or key_lengths is not None else "sdpa"


def attention(q, k, v, *, q_offsets, k_offsets, key_lengths=None, mask="full", tokens_per_frame=1, proto_tokens=1,
              backend="auto", out=None, precision=ATTENTION_PRECISIONS[0]):
    """Joint attention on prologue outputs (Q scaled by ``sm_scale * log2(e)``, K by its key scales, both
    rotated): q [B, Nq, H, D], k/v [B, Nk, H, D]; the sequences are [video | reference | context] streams split at
    ``q_offsets``/``k_offsets``, ``key_lengths`` [B] (or None) masks each row's padded keys; see
    ``rotated_attention_reference``. ``precision="int8"``: ``quantized_attention``."""
    kw = dict(q_offsets=q_offsets, k_offsets=k_offsets, key_lengths=key_lengths, mask=mask,
              tokens_per_frame=tokens_per_frame, proto_tokens=proto_tokens)
    if precision not in ATTENTION_PRECISIONS:
        raise ValueError(f"attention precision must be one of {ATTENTION_PRECISIONS}, got {precision!r}")
    if precision == "int8":
        return quantized_attention(q, k, v, **kw, backend=backend, out=out)
    path = attention_path(backend, q, mask, key_lengths)
    if path == "triton":
        from .joint_attention.kernel import attention_triton
        return attention_triton(q, k, v, out=out, **kw)
    if path == "sdpa":
        return rotated_attention_sdpa(q, k, v, out=out, **kw)
    result = rotated_attention_reference(q, k, v, **kw)
    return result if out is None else out.copy_(result)


def quantized_attention(q, k, v, *, q_offsets, k_offsets, key_lengths=None, mask="full", tokens_per_frame=1,
                        proto_tokens=1, backend="auto", pv=None, out=None):
    """The 8-bit joint attention (INT8 QK^T, K smoothed, per-block scales; P.V in FP8, or in 16 bits with
    ``pv="16bit"``, the default before sm_89) on the prologue's outputs, arguments as ``attention``; see
    ``quantized_attention_reference``. Every mask runs the Triton kernel (``auto``: CUDA fp16/bf16 with D in
    (64, 128); ``sdpa`` is ``auto`` here, SDPA has no 8-bit form), else the float64 reference, the CPU path."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    kw = dict(q_offsets=q_offsets, k_offsets=k_offsets, key_lengths=key_lengths, mask=mask,
              tokens_per_frame=tokens_per_frame, proto_tokens=proto_tokens, out=out,
              pv=default_pv(q.device) if pv is None else pv)
    supported = (q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in ATTENTION_HEAD_DIMS
                 and all(t.is_cuda and t.dtype == q.dtype for t in (q, k, v)))
    if backend == "triton" or (backend in ("auto", "sdpa") and supported):
        from .quantized_attention.kernel import quantized_attention_triton
        return quantized_attention_triton(q, k, v, **kw)
    return quantized_attention_reference(q, k, v, **kw, block_q=DEFAULT_BLOCKS[0], block_k=DEFAULT_BLOCKS[1])


def kernel_backend(attention_backend: str) -> str:
    """The backend of the other kernels (prologue, fusions, PPA, M2HVideo) for an attention backend: the
    kernel wherever the attention runs on GPU."""
    return {"reference": "reference", "triton": "triton"}.get(attention_backend, "auto")


def joint_attention(q, k, v, q_pos, k_pos, *, q_offsets, k_offsets, key_lengths=None, key_scale=None, mask="full",
                    tokens_per_frame=1, proto_tokens=1, theta=10000.0, rope_axes=None, sm_scale=None, backend="auto",
                    out=None):
    """Joint attention over [video | reference | context] tokens from unrotated Q/K and integer positions: the
    prologue (no norm) then ``attention``. q [B, Nq, H, D], k/v [B, Nk, H, D], q_pos [Nq, 3], k_pos [Nk, 3],
    key_scale [Nk] or None; semantics of ``joint_attention_reference``."""
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k = qk_prologue(q, k, q_pos, k_pos, q_scale=scale * LOG2E, key_scale=key_scale, theta=theta,
                       rope_axes=rope_axes, backend=kernel_backend(backend))
    return attention(q, k, v, q_offsets=q_offsets, k_offsets=k_offsets, key_lengths=key_lengths, mask=mask,
                     tokens_per_frame=tokens_per_frame, proto_tokens=proto_tokens, backend=backend, out=out)


def prototype_aggregate(pose_q, pose_k, ref_feats, *, sm_scale=None, backend="auto"):
    """ProFashion PPA: (prototype [B, F, T, C], token_scores [B, F, R, T], view_scores [B, F, R]).

    See ``prototype_aggregate_reference`` for shapes and definitions.
    """
    if _use_kernel(backend, (pose_q, pose_k, ref_feats)):
        from .prototype.kernel import prototype_aggregate_triton
        return prototype_aggregate_triton(pose_q, pose_k, ref_feats, sm_scale=sm_scale)
    return prototype_aggregate_reference(pose_q, pose_k, ref_feats, sm_scale=sm_scale)


def adaln_layernorm(x, shift, scale, *, eps=1e-6, backend="auto"):
    """``LayerNorm(x) * (1 + scale) + shift`` over the channel dim; see ``adaln_layernorm_reference``. ``auto``
    takes the kernel for contiguous rows only (the kernel reads whole rows)."""
    if _use_kernel(backend, (x, shift, scale), x.is_contiguous() and x.numel() > 0):
        from .fusions.kernel import adaln_layernorm_triton
        return adaln_layernorm_triton(x, shift, scale, eps=eps)
    return adaln_layernorm_reference(x, shift, scale, eps=eps)


def gated_residual(x, y, gate, *, backend="auto"):
    """``x + y * gate``; see ``gated_residual_reference`` (``auto``: the kernel for contiguous x and y)."""
    if _use_kernel(backend, (x, y, gate), x.is_contiguous() and y.is_contiguous() and x.numel() > 0):
        from .fusions.kernel import gated_residual_triton
        return gated_residual_triton(x, y, gate)
    return gated_residual_reference(x, y, gate)


def distribution_fusion(za, zb, *, eps=1e-6, backend="auto"):
    """M2HVideo: ``(za - mu_a) / sigma_a * sigma_b + mu_b + zb``; see ``distribution_fusion_reference``."""
    if _use_kernel(backend, (za, zb)):
        from .fusions.kernel import distribution_fusion_triton
        return distribution_fusion_triton(za, zb, eps=eps)
    return distribution_fusion_reference(za, zb, eps=eps)


def batch_invariant_linear(x, weight, bias=None, backend="auto", *, out=None):
    """``x @ weight.T + bias`` (nn.Linear's layout: x [..., K], weight [N, K], bias [N] or None) whose rows' bits do
    not depend on the other rows of x (``--deterministic``: a request alone or batched gives the same output); see
    ``batch_invariant_linear_reference``. ``auto``: the kernel for CUDA tensors of one kernel dtype, unit-stride in
    their last dim."""
    check_linear(x, weight, bias)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    supported = x.dtype == weight.dtype and all(t.stride(-1) == 1 for t in tensors)
    if _use_kernel(backend, tensors, supported):
        from .batch_invariant.kernel import batch_invariant_linear_triton
        return batch_invariant_linear_triton(x, weight, bias, out=out)
    return batch_invariant_linear_reference(x, weight, bias, out=out)
