"""PyTorch reference of the QK prologue: the test oracle and the CPU path.

What the attention's Q and K go through once per layer before any tile of the flash loop sees them:

    y = RMSNorm(x) * weight          optional; ``norm="across_heads"``: over all heads of a token, weight
                                      [H*D] (Wan's ``rms_norm_across_heads``); ``"per_head"``: over each
                                      head's D channels, weight [D] shared by the heads (HunyuanVideo)
    y = R(pos) y                      3-axis RoPE from integer positions (``kernels.rope``; ``rope_axes`` the
                                      band sizes, None for Wan's)
    y = y * scale * token_scale[n]    Q: the softmax scale (times log2(e) for base-2 logits); K: each key's
                                      logit multiplier (MVAnimate's per-view omega), so ``q . k`` is the logit

One rounding to the output dtype at the end: the fused kernel keeps the normalised value in fp32 registers,
so the reference does not round between the steps either (float64 inputs give the float64 oracle).
"""
from __future__ import annotations

import torch

from ..rope import apply_rope, rope_angles

NORM_MODES = ("across_heads", "per_head")


def check_norm(norm: str, weight: torch.Tensor | None, heads: int, head_dim: int, name: str = "weight") -> None:
    """One-line ValueErrors for the norm mode and the shape its weight must have."""
    if norm not in NORM_MODES:
        raise ValueError(f"norm must be one of {NORM_MODES}, got {norm!r}")
    if weight is None:
        return
    want = (heads * head_dim,) if norm == "across_heads" else (head_dim,)
    if tuple(weight.shape) != want:
        what = "heads x head_dim" if norm == "across_heads" else "head_dim"
        raise ValueError(f"{name} must be [{want[0]}] ({what}) for norm={norm!r}, got {tuple(weight.shape)}")


def qk_prologue_one(x, pos, *, weight=None, eps=1e-6, scale=1.0, token_scale=None, theta=10000.0, out=None,
                    rope=None, rope_axes=None, norm="across_heads"):
    """One tensor through the prologue: x [B, N, H, D], pos [N, 3] int, weight ([H*D] for ``norm=
    "across_heads"``, [D] for ``"per_head"``) or None (no norm), ``scale`` a number, ``token_scale`` [N] or
    None, ``rope`` the positions' ``kernels.rope.rope_table`` (same ``rope_axes``) when the caller has it
    (float32; float64 inputs always compute theirs). Returns [B, N, H, D] in x's dtype (or writes ``out``)."""
    check_norm(norm, weight, x.shape[2], x.shape[3])
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cdt)
    if weight is not None:
        if norm == "per_head":
            y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps) * weight.to(cdt)
        else:
            flat = y.flatten(2)
            flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps) * weight.to(cdt)
            y = flat.unflatten(2, x.shape[2:])
    if rope is not None and rope[0].dtype == cdt:
        y = apply_rope(y, table=rope)
    else:
        y = apply_rope(y, rope_angles(pos, x.shape[-1], theta, cdt, rope_axes))
    factor = torch.full((x.shape[1],), float(scale), dtype=cdt, device=x.device)
    if token_scale is not None:
        factor = factor * token_scale.to(device=x.device, dtype=cdt)
    y = (y * factor[None, :, None, None]).to(x.dtype)
    return y if out is None else out.copy_(y)


def qk_prologue_reference(q, k, q_pos, k_pos, *, weight_q=None, weight_k=None, eps=1e-6, q_scale=1.0,
                          key_scale=None, theta=10000.0, out_q=None, out_k=None, q_rope=None, k_rope=None,
                          rope_axes=None, norm="across_heads"):
    """(Q, K) through the prologue: q [B, Nq, H, D] or None (keys only: Q comes back None), k [B, Nk, H, D];
    see ``qk_prologue_one``."""
    for name, w, x in (("weight_q", weight_q, q), ("weight_k", weight_k, k)):
        if x is not None:
            check_norm(norm, w, x.shape[2], x.shape[3], name)
    rotated_q = None if q is None else qk_prologue_one(q, q_pos, weight=weight_q, eps=eps, scale=q_scale,
                                                       theta=theta, out=out_q, rope=q_rope, rope_axes=rope_axes,
                                                       norm=norm)
    return rotated_q, qk_prologue_one(k, k_pos, weight=weight_k, eps=eps, token_scale=key_scale, theta=theta,
                                      out=out_k, rope=k_rope, rope_axes=rope_axes, norm=norm)
