"""Custom kernels for mvgen. Each kernel has a PyTorch reference beside it (the CPU path and the oracle).

Every op here is a dispatch point with a ``backend`` switch:
  ``"auto"``      the Triton kernel for CUDA tensors of a supported dtype/shape, the reference otherwise;
  ``"reference"`` always the PyTorch reference (debugging, ONNX export);
  ``"triton"``    always the kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
Kernel modules (and so Triton itself) are imported only when a kernel is launched, so importing ``kernels``
never needs Triton and ``TRITON_INTERPRET`` can still be set by a test harness beforehand.
"""
from __future__ import annotations

import torch

from .fusions.reference import (
    adaln_layernorm_reference,
    distribution_fusion_reference,
    gated_residual_reference,
    qk_rmsnorm_reference,
)
from .joint_attention import joint_attention_reference
from .prototype.reference import prototype_aggregate_reference

BACKENDS = ("auto", "reference", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ATTENTION_HEAD_DIMS = (64, 128)

__all__ = [
    "BACKENDS", "joint_attention", "prototype_aggregate", "adaln_layernorm", "qk_rmsnorm", "gated_residual",
    "distribution_fusion", "joint_attention_reference", "prototype_aggregate_reference",
    "adaln_layernorm_reference", "qk_rmsnorm_reference", "gated_residual_reference",
    "distribution_fusion_reference",
]


def _use_kernel(backend: str, tensors, supported: bool = True) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return supported and all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in tensors)
    return backend == "triton"


def joint_attention(q, k, v, q_pos, k_pos, *, n_video_q, n_video_k, key_scale=None, mask="full",
                    tokens_per_frame=1, proto_tokens=1, theta=10000.0, sm_scale=None, backend="auto", out=None):
    """Joint attention over [video | other stream] tokens with RoPE from integer positions.

    q [B, Nq, H, D], k/v [B, Nk, H, D], q_pos [Nq, 3], k_pos [Nk, 3] int, key_scale [Nk] or None; see
    ``joint_attention_reference`` for the semantics. ``auto`` takes the kernel for CUDA fp16/bf16 with
    D in (64, 128); fp32 stays on the reference under ``auto`` because the kernel's fp32 path (IEEE products
    on CUDA cores, small tiles) is an exactness path, not a fast one; ``backend="triton"`` runs it.
    ``out``, if given, receives the result and is returned.
    """
    kw = dict(n_video_q=n_video_q, n_video_k=n_video_k, key_scale=key_scale, mask=mask,
              tokens_per_frame=tokens_per_frame, proto_tokens=proto_tokens, theta=theta, sm_scale=sm_scale)
    if _use_kernel(backend, (q, k, v), q.shape[-1] in ATTENTION_HEAD_DIMS and q.dtype != torch.float32):
        from .joint_attention.kernel import joint_attention_triton
        return joint_attention_triton(q, k, v, q_pos, k_pos, out=out, **kw)
    result = joint_attention_reference(q, k, v, q_pos, k_pos, **kw)
    return result if out is None else out.copy_(result)


def prototype_aggregate(pose_q, pose_k, ref_feats, *, sm_scale=None, backend="auto"):
    """ProFashion PPA: (prototype [B, F, T, C], token_scores [B, F, R, T], view_scores [B, F, R]).

    See ``prototype_aggregate_reference`` for shapes and definitions.
    """
    if _use_kernel(backend, (pose_q, pose_k, ref_feats)):
        from .prototype.kernel import prototype_aggregate_triton
        return prototype_aggregate_triton(pose_q, pose_k, ref_feats, sm_scale=sm_scale)
    return prototype_aggregate_reference(pose_q, pose_k, ref_feats, sm_scale=sm_scale)


def adaln_layernorm(x, shift, scale, *, eps=1e-6, backend="auto"):
    """``LayerNorm(x) * (1 + scale) + shift`` over the channel dim; see ``adaln_layernorm_reference``."""
    if _use_kernel(backend, (x, shift, scale)):
        from .fusions.kernel import adaln_layernorm_triton
        return adaln_layernorm_triton(x, shift, scale, eps=eps)
    return adaln_layernorm_reference(x, shift, scale, eps=eps)


def qk_rmsnorm(q, k, weight_q, weight_k, *, eps=1e-6, backend="auto"):
    """RMSNorm of q and k across all heads (Wan's ``rms_norm_across_heads``); see ``qk_rmsnorm_reference``."""
    if _use_kernel(backend, (q, k, weight_q, weight_k)):
        from .fusions.kernel import qk_rmsnorm_triton
        return qk_rmsnorm_triton(q, k, weight_q, weight_k, eps=eps)
    return qk_rmsnorm_reference(q, k, weight_q, weight_k, eps=eps)


def gated_residual(x, y, gate, *, backend="auto"):
    """``x + y * gate``; see ``gated_residual_reference``."""
    if _use_kernel(backend, (x, y, gate)):
        from .fusions.kernel import gated_residual_triton
        return gated_residual_triton(x, y, gate)
    return gated_residual_reference(x, y, gate)


def distribution_fusion(za, zb, *, eps=1e-6, backend="auto"):
    """M2HVideo: ``(za - mu_a) / sigma_a * sigma_b + mu_b + zb``; see ``distribution_fusion_reference``."""
    if _use_kernel(backend, (za, zb)):
        from .fusions.kernel import distribution_fusion_triton
        return distribution_fusion_triton(za, zb, eps=eps)
    return distribution_fusion_reference(za, zb, eps=eps)
