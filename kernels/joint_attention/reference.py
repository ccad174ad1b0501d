"""PyTorch references of the multi-stream joint attention: the test oracles and the CPU path.

``joint_attention_reference`` is the whole operation from unrotated Q/K and positions (the float64 oracle of
the prologue + attention pair); ``rotated_attention_reference`` is what runs after the QK prologue
(``kernels.qk_prologue``): pre-rotated Q/K with the scales folded in and base-2 logits, the semantics of the
Triton kernel and of the SDPA path.

The query (key) sequence is three consecutive streams given by two offsets ``o`` = ``q_offsets``
(``k_offsets``): video ``[0, o[0])``, reference ``[o[0], o[1])``, context ``[o[1], N)`` (HunyuanVideo's text
tokens; Wan has none: ``o = (n_video, N)``). In ``prototype`` mode the reference stream holds the prototype
tokens (a context stream stays the MMDiT's text). Queries and keys may have different lengths (e.g. video-only queries against [video | cached
reference] keys). ``key_lengths`` [B] masks, per batch row, every key at or past its length (the padded tail of
the context stream) for every query.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..rope import apply_rope, rope_angles

# the attention masks, declared once: the config's ref_attention values, the kernel's MASK_MODE ids (their index
# here), the export's plugin masks (the prefix that needs no per-frame layout), the native enum (checked in a test)
MASK_MODES = ("full", "isolated", "prototype")
MASK_IDS = {mask: i for i, mask in enumerate(MASK_MODES)}
# what the ONNX plugin, the AOT kernel library and the TensorRT plugin build: ``prototype`` needs PPA's per-frame
# prototype layout, which the plugin node does not carry
EXPORTED_MASKS = MASK_MODES[:2]


def _concrete(*values) -> bool:
    """Plain ints: sizes a check can read (under torch.export they are symbolic and the check is skipped)."""
    return all(isinstance(v, int) for v in values)


def check_streams(n_q, n_k, q_offsets, k_offsets, mask: str, key_lengths: torch.Tensor | None = None,
                  batch=None) -> None:
    """One-line ValueErrors for stream offsets, the mask mode and key lengths (shape [B], int32/int64, values in
    [0, n_k]; values are read only from CPU tensors outside tracing: no device sync per call, and the kernel
    clamps lengths past n_k)."""
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {MASK_MODES}, got {mask!r}")
    for name, o, n in (("q_offsets", q_offsets, n_q), ("k_offsets", k_offsets, n_k)):
        if not isinstance(o, (tuple, list)) or len(o) != 2:
            raise ValueError(f"{name} must be (reference start, context start), got {o!r}")
        if _concrete(*o, n) and not 0 <= o[0] <= o[1] <= n:
            raise ValueError(f"{name} must satisfy 0 <= {name}[0] <= {name}[1] <= {n}, got {tuple(o)}")
    if key_lengths is None:
        return
    if key_lengths.dtype not in (torch.int32, torch.int64) or key_lengths.dim() != 1 or (
            batch is not None and _concrete(batch, key_lengths.shape[0]) and key_lengths.shape[0] != batch):
        raise ValueError(f"key_lengths must be int32/int64 [{'B' if batch is None else batch}], got "
                         f"{key_lengths.dtype} {tuple(key_lengths.shape)}")
    if (key_lengths.device.type == "cpu" and _concrete(n_k) and not torch.compiler.is_compiling()
            and not torch.onnx.is_in_onnx_export() and key_lengths.numel()
            and not (0 <= int(key_lengths.min()) and int(key_lengths.max()) <= n_k)):
        raise ValueError(f"key_lengths must lie in [0, {n_k}], got {key_lengths.tolist()}")


def attention_mask(
    n_q: int,
    n_k: int,
    q_offsets: tuple[int, int],
    k_offsets: tuple[int, int],
    mode: str,
    tokens_per_frame: int = 1,
    proto_tokens: int = 1,
    device=None,
    key_lengths: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask (True = may attend) for ``mode``: [n_q, n_k], or [B, 1, n_q, n_k] with ``key_lengths``
    ([B, 1, 1, n_k] for ``full``: the same for every query, SDPA broadcasts it); None for ``full`` without key
    lengths.

    - ``isolated``: reference queries see only reference keys; video and context queries see every key.
    - ``prototype``: video query of frame ``i // tokens_per_frame`` sees all video keys, the ``proto_tokens``
      keys of its own frame's prototype and every context key; context queries see the video and context keys
      (a prototype belongs to one frame); queries of the reference range see only non-video keys.
    - ``key_lengths``: in batch row b, keys at index >= ``key_lengths[b]`` are masked for every query.

    Boolean algebra on index comparisons only (no bool-valued torch.where, which onnxruntime cannot run in an
    exported graph; ``arange`` on the sizes keeps them symbolic under torch.export).
    """
    check_streams(n_q, n_k, q_offsets, k_offsets, mode, key_lengths)
    return _allowed(n_q, n_k, q_offsets, k_offsets, mode, tokens_per_frame, proto_tokens, device, key_lengths)


def _allowed(n_q, n_k, q_offsets, k_offsets, mode, tokens_per_frame, proto_tokens, device, key_lengths):
    """``attention_mask`` on arguments already checked (each public entry checks them once per call)."""
    qi = torch.arange(n_q, device=device)[:, None]
    kj = torch.arange(n_k, device=device)[None, :]
    allowed = None
    if mode == "isolated":
        q_ref = (qi >= q_offsets[0]) & (qi < q_offsets[1])
        k_ref = (kj >= k_offsets[0]) & (kj < k_offsets[1])
        allowed = ~q_ref | k_ref
    elif mode == "prototype":
        q_video, q_context = qi < q_offsets[0], qi >= q_offsets[1]
        k_video, k_context = kj < k_offsets[0], kj >= k_offsets[1]
        same_frame = ~k_context & ((kj - k_offsets[0]) // proto_tokens == qi // tokens_per_frame)
        allowed = ((q_video & (k_video | same_frame | k_context)) | (q_context & (k_video | k_context))
                   | (~q_video & ~q_context & ~k_video))
    if key_lengths is None:
        return allowed
    valid = kj < key_lengths.to(device)[:, None, None, None]  # [B, 1, 1, n_k]
    return valid if allowed is None else valid & allowed  # [B, 1, 1, n_k] (broadcast over queries) or [B, 1, n_q, n_k]


def joint_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    q_offsets: tuple[int, int],
    k_offsets: tuple[int, int],
    key_lengths: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
    mask: str = "full",
    tokens_per_frame: int = 1,
    proto_tokens: int = 1,
    theta: float = 10000.0,
    rope_axes: tuple[int, int, int] | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """softmax(key_scale_j * (R q_i) . (R k_j) * sm_scale + mask) @ v.

    q [B, Nq, H, D], k/v [B, Nk, H, D]; q_pos [Nq, 3], k_pos [Nk, 3] integer (t, h, w) positions;
    key_scale [Nk] multiplies each key's logits (MVAnimate's per-view omega; 1 for video keys); ``rope_axes``
    the RoPE band sizes (``kernels.rope.rope_bands``; None: Wan's). Float64 inputs give the float64 oracle;
    lower precisions do the RoPE math in float32.
    """
    head_dim = q.shape[-1]
    angle_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q = apply_rope(q, rope_angles(q_pos, head_dim, theta, angle_dtype, rope_axes))
    k = apply_rope(k, rope_angles(k_pos, head_dim, theta, angle_dtype, rope_axes))
    if key_scale is not None:
        # scaling key j scales exactly the logits of key j
        k = (k.to(angle_dtype) * key_scale.to(angle_dtype)[None, :, None, None]).to(k.dtype)
    check_streams(q.shape[1], k.shape[1], q_offsets, k_offsets, mask, key_lengths, q.shape[0])
    allowed = _allowed(q.shape[1], k.shape[1], q_offsets, k_offsets, mask, tokens_per_frame, proto_tokens, q.device,
                       key_lengths)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=scale
    )
    return out.transpose(1, 2)


LN2 = math.log(2.0)


def rotated_attention_reference(q, k, v, *, q_offsets, k_offsets, key_lengths=None, mask="full", tokens_per_frame=1,
                                proto_tokens=1):
    """softmax_2(q_i . k_j + mask) @ v on prologue outputs: q [B, Nq, H, D] already scaled by
    ``sm_scale * log2(e)`` and rotated, k [B, Nk, H, D] rotated and multiplied by each key's scale, so
    ``q . k`` is the logit in base 2 (``2**x = e**(x ln 2)``: SDPA's scale is ln 2). Streams, masks and
    ``key_lengths`` as ``attention_mask``; a query with no allowed key gives NaN here (0 in the kernel)."""
    check_streams(q.shape[1], k.shape[1], q_offsets, k_offsets, mask, key_lengths, q.shape[0])
    return _sdpa(q, k, v, _allowed(q.shape[1], k.shape[1], q_offsets, k_offsets, mask, tokens_per_frame,
                                          proto_tokens, q.device, key_lengths))




def _sdpa(q, k, v, allowed=None):
    """SDPA on [B, N, H, D] prologue outputs (base-2 logits: scale ln 2), with a boolean mask or none."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=allowed, scale=LN2).transpose(1, 2)


def rotated_attention_sdpa(q, k, v, *, q_offsets, k_offsets, key_lengths=None, mask="full", tokens_per_frame=1,
                           proto_tokens=1, out=None):
    """``rotated_attention_reference`` through mask-free SDPA calls, which PyTorch sends to its flash/cuDNN
    kernels on GPU: ``full`` is one call; ``isolated`` one per query stream (video and context queries over
    every key, reference queries over the reference keys; one call when there are no reference queries).
    ``prototype`` and any ``key_lengths`` have no mask-free form and take SDPA with the boolean mask."""
    n_q = q.shape[1]
    check_streams(n_q, k.shape[1], q_offsets, k_offsets, mask, key_lengths, q.shape[0])
    if mask == "prototype" or key_lengths is not None:
        result = _sdpa(q, k, v, _allowed(n_q, k.shape[1], q_offsets, k_offsets, mask, tokens_per_frame,
                                                proto_tokens, q.device, key_lengths))
        return result if out is None else out.copy_(result)
    (q_ref, q_ctx), (k_ref, k_ctx) = q_offsets, k_offsets
    if mask == "full" or q_ref == q_ctx:
        result = _sdpa(q, k, v)
        return result if out is None else out.copy_(result)
    out = torch.empty_like(q) if out is None else out
    if q_ref:
        out[:, :q_ref] = _sdpa(q[:, :q_ref], k, v)
    out[:, q_ref:q_ctx] = _sdpa(q[:, q_ref:q_ctx], k[:, k_ref:k_ctx], v[:, k_ref:k_ctx])
    if q_ctx < n_q:
        out[:, q_ctx:] = _sdpa(q[:, q_ctx:], k, v)
    return out
