"""PyTorch reference of the fused multi-stream joint attention: the test oracle and the CPU path.

Token order along the sequence: video tokens first, then the other stream (reference tokens, or
prototype tokens in ``prototype`` mode). Queries and keys may have different lengths (e.g. video-only
queries against [video | cached reference] keys).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..rope import apply_rope, rope_angles

MASK_MODES = ("full", "isolated", "prototype")


def attention_mask(
    n_q: int,
    n_k: int,
    n_video_q: int,
    n_video_k: int,
    mode: str,
    tokens_per_frame: int = 1,
    proto_tokens: int = 1,
    device=None,
) -> torch.Tensor | None:
    """Boolean [n_q, n_k] mask (True = may attend) for ``mode``; None for ``full``.

    - ``isolated``: queries past ``n_video_q`` (reference) see only keys past ``n_video_k``.
    - ``prototype``: video query of frame ``i // tokens_per_frame`` sees all video keys plus the
      ``proto_tokens`` keys of its own frame's prototype; other queries see only non-video keys.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    if mode == "full":
        return None
    qi = torch.arange(n_q, device=device)[:, None]
    kj = torch.arange(n_k, device=device)[None, :]
    q_video = qi < n_video_q
    k_video = kj < n_video_k
    if mode == "isolated":
        return q_video | ~k_video
    same_frame = (kj - n_video_k) // proto_tokens == qi // tokens_per_frame
    # boolean algebra rather than a bool-valued torch.where, which onnxruntime cannot run in an exported graph
    return (q_video & (k_video | same_frame)) | (~q_video & ~k_video)


def joint_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    n_video_q: int,
    n_video_k: int,
    key_scale: torch.Tensor | None = None,
    mask: str = "full",
    tokens_per_frame: int = 1,
    proto_tokens: int = 1,
    theta: float = 10000.0,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """softmax(key_scale_j * (R q_i) . (R k_j) * sm_scale + mask) @ v.

    q [B, Nq, H, D], k/v [B, Nk, H, D]; q_pos [Nq, 3], k_pos [Nk, 3] integer (t, h, w) positions;
    key_scale [Nk] multiplies each key's logits (MVAnimate's per-view omega; 1 for video keys).
    Float64 inputs give the float64 oracle; lower precisions do the RoPE math in float32.
    """
    head_dim = q.shape[-1]
    angle_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q = apply_rope(q, rope_angles(q_pos, head_dim, theta, angle_dtype))
    k = apply_rope(k, rope_angles(k_pos, head_dim, theta, angle_dtype))
    if key_scale is not None:
        # scaling key j scales exactly the logits of key j
        k = (k.to(angle_dtype) * key_scale.to(angle_dtype)[None, :, None, None]).to(k.dtype)
    allowed = attention_mask(
        q.shape[1], k.shape[1], n_video_q, n_video_k, mask, tokens_per_frame, proto_tokens, q.device
    )
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=scale
    )
    return out.transpose(1, 2)
