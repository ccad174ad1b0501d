"""PyTorch references of the small fusions: the test oracle and the CPU path.

Statistics and arithmetic are in float32 (float64 for float64 inputs, the oracle); results are cast back to
the dtype of the main input, as diffusers' Wan blocks do (``norm1(x.float()) ... .type_as(x)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def adaln_layernorm_reference(x, shift, scale, *, eps: float = 1e-6):
    """``LayerNorm(x) * (1 + scale) + shift``: x [B, N, C]; shift, scale broadcastable to it ([B, 1, C] in
    Wan2.1, [B, N, C] per token). LayerNorm over C without affine parameters, biased variance, ``eps`` inside
    the square root (Wan's ``norm1``/``norm3``, eps 1e-6)."""
    cdt = _compute_dtype(x)
    y = F.layer_norm(x.to(cdt), x.shape[-1:], eps=eps)
    return (y * (1 + scale.to(cdt)) + shift.to(cdt)).to(x.dtype)


def gated_residual_reference(x, y, gate):
    """``x + y * gate`` (the gated residual of AdaLN-Zero blocks); y like x, gate broadcastable to x."""
    cdt = _compute_dtype(x)
    return (x.to(cdt) + y.to(cdt) * gate.to(cdt)).to(x.dtype)


def distribution_fusion_reference(za, zb, *, eps: float = 1e-6):
    """M2HVideo's distribution-aware fusion of two cross-attention outputs of the same shape [..., C]:
    ``(za - mu_a) / sigma_a * sigma_b + mu_b + zb`` with mu, sigma the mean and standard deviation over the
    channel dim C of each token, ``sigma = sqrt(biased variance + eps)``. Output in zb's dtype."""
    cdt = _compute_dtype(zb)
    a, b = za.to(cdt), zb.to(cdt)
    var_a, mu_a = torch.var_mean(a, dim=-1, correction=0, keepdim=True)
    var_b, mu_b = torch.var_mean(b, dim=-1, correction=0, keepdim=True)
    return ((a - mu_a) * torch.rsqrt(var_a + eps) * torch.sqrt(var_b + eps) + mu_b + b).to(zb.dtype)
