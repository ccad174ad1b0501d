"""PyTorch references of the multi-stream joint attention: the test oracles and the CPU path.

``joint_attention_reference`` is the whole operation from unrotated Q/K and positions (the float64 oracle of
the prologue + attention pair); ``rotated_attention_reference`` is what runs after the QK prologue
(``kernels.qk_prologue``): pre-rotated Q/K with the scales folded in and base-2 logits, the semantics of the
Triton kernel and of the SDPA path.

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


LN2 = math.log(2.0)


def rotated_attention_reference(q, k, v, *, n_video_q, n_video_k, mask="full", tokens_per_frame=1,
                                proto_tokens=1):
    """softmax_2(q_i . k_j + mask) @ v on prologue outputs: q [B, Nq, H, D] already scaled by
    ``sm_scale * log2(e)`` and rotated, k [B, Nk, H, D] rotated and multiplied by each key's scale, so
    ``q . k`` is the logit in base 2 (``2**x = e**(x ln 2)``: SDPA's scale is ln 2). Masks as
    ``attention_mask``."""
    allowed = attention_mask(q.shape[1], k.shape[1], n_video_q, n_video_k, mask, tokens_per_frame, proto_tokens,
                             q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=allowed, scale=LN2)
    return out.transpose(1, 2)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=LN2).transpose(1, 2)


def rotated_attention_sdpa(q, k, v, *, n_video_q, n_video_k, mask="full", tokens_per_frame=1, proto_tokens=1,
                           out=None):
    """``rotated_attention_reference`` through mask-free SDPA calls, which PyTorch sends to its flash/cuDNN
    kernels on GPU: ``full`` is one call; ``isolated`` two (video queries over every key, reference queries
    over the reference keys); ``prototype`` has no mask-free form and takes SDPA with its boolean mask."""
    if mask == "prototype":
        result = rotated_attention_reference(q, k, v, n_video_q=n_video_q, n_video_k=n_video_k, mask=mask,
                                             tokens_per_frame=tokens_per_frame, proto_tokens=proto_tokens)
        return result if out is None else out.copy_(result)
    if mask not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mask!r}")
    if mask == "full" or n_video_q == q.shape[1]:
        result = _sdpa(q, k, v)
        return result if out is None else out.copy_(result)
    out = torch.empty_like(q) if out is None else out
    if n_video_q:
        out[:, :n_video_q] = _sdpa(q[:, :n_video_q], k, v)
    out[:, n_video_q:] = _sdpa(q[:, n_video_q:], k[:, n_video_k:], v[:, n_video_k:])
    return out
