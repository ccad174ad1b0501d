"""Triton kernel of the QK prologue: one program per (token, tensor), all heads of the token in registers.

Semantics are those of ``reference.qk_prologue_reference`` (RMSNorm across the token's heads or per head,
RoPE bands from ``rope_axes``). Q and K are read once and written once per layer
(RMSNorm, rotation and scales in fp32 registers, one rounding at the store); the rotation angles of a token
are computed once ([D/2] sin/cos, with range reduction: positions of decoupled references reach |t| ~ 100)
and broadcast over its heads, so the attention loop that follows does no trigonometry at all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import check_device, check_operand, emulate_bf16, narrow
from ..rope import rope_bands, rope_inv_freq
from .reference import check_norm

HEAD_DIMS = (64, 128)


@triton.jit
def _prologue_row(X, W, Pos, TokenScale, InvFreq, Out, row, n_tokens, n_heads, stride_xb, stride_xn,
                  stride_ob, stride_on, eps, scale,
                  HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, T_PAIRS: tl.constexpr, H_PAIRS: tl.constexpr,
                  HAS_NORM: tl.constexpr, NORM_PER_HEAD: tl.constexpr, HAS_TOKEN_SCALE: tl.constexpr,
                  EMULATE_BF16: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    batch = row // n_tokens
    token = row % n_tokens
    offs_h = tl.arange(0, BLOCK_H)
    offs_c = offs_h[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    heads = (offs_h < n_heads)[:, None]
    x = tl.load(X + batch.to(tl.int64) * stride_xb + token.to(tl.int64) * stride_xn + offs_c,
                mask=heads, other=0.0).to(tl.float32)
    if HAS_NORM:
        if NORM_PER_HEAD:  # RMSNorm over each head's channels, one [D] weight for every head
            mean_square = tl.sum(x * x, 1) / HEAD_DIM
            w = tl.load(W + tl.arange(0, HEAD_DIM)).to(tl.float32)
            x = x / tl.sqrt_rn(mean_square + eps)[:, None] * w[None, :]
        else:  # RMSNorm over all heads of the token
            mean_square = tl.sum(tl.sum(x * x, 1), 0) / (n_heads * HEAD_DIM)
            x = x / tl.sqrt_rn(mean_square + eps) * tl.load(W + offs_c, mask=heads, other=0.0).to(tl.float32)
    # the token's D/2 angles: pair j reads the position axis of its band (t, h, w)
    pos_t = tl.load(Pos + token * 3 + 0).to(tl.float32)
    pos_h = tl.load(Pos + token * 3 + 1).to(tl.float32)
    pos_w = tl.load(Pos + token * 3 + 2).to(tl.float32)
    pair = tl.arange(0, HALF)
    pos = tl.where(pair < T_PAIRS, pos_t, tl.where(pair < T_PAIRS + H_PAIRS, pos_h, pos_w))
    angle = pos * tl.load(InvFreq + pair)
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :]
    factor = scale
    if HAS_TOKEN_SCALE:
        factor = factor * tl.load(TokenScale + token)
    even, odd = tl.split(tl.reshape(x, (BLOCK_H, HALF, 2)))
    y = tl.reshape(tl.join((even * cos - odd * sin) * factor, (even * sin + odd * cos) * factor),
                   (BLOCK_H, HEAD_DIM))
    out_ty = Out.dtype.element_ty
    tl.store(Out + batch.to(tl.int64) * stride_ob + token.to(tl.int64) * stride_on + offs_c,
             narrow(y, out_ty, EMULATE_BF16).to(out_ty), mask=heads)


@triton.jit
def _qk_prologue_fwd(Q, K, WQ, WK, QPos, KPos, KeyScale, InvFreq, OutQ, OutK,
                     n_q, n_k, rows_q, rows_k, n_heads,
                     stride_qb, stride_qn, stride_kb, stride_kn, stride_oqb, stride_oqn, stride_okb, stride_okn,
                     eps, q_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, T_PAIRS: tl.constexpr, H_PAIRS: tl.constexpr,
                     HAS_NORM: tl.constexpr, NORM_PER_HEAD: tl.constexpr, HAS_KEY_SCALE: tl.constexpr,
                     EMULATE_BF16: tl.constexpr):
    row = tl.program_id(0)
    if tl.program_id(1) == 0:
        if row < rows_q:
            _prologue_row(Q, WQ, QPos, KeyScale, InvFreq, OutQ, row, n_q, n_heads, stride_qb, stride_qn,
                          stride_oqb, stride_oqn, eps, q_scale, HEAD_DIM, BLOCK_H, T_PAIRS, H_PAIRS,
                          HAS_NORM, NORM_PER_HEAD, False, EMULATE_BF16)
    else:
        if row < rows_k:
            _prologue_row(K, WK, KPos, KeyScale, InvFreq, OutK, row, n_k, n_heads, stride_kb, stride_kn,
                          stride_okb, stride_okn, eps, 1.0, HEAD_DIM, BLOCK_H, T_PAIRS, H_PAIRS,
                          HAS_NORM, NORM_PER_HEAD, HAS_KEY_SCALE, EMULATE_BF16)


def launch_shape(heads: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps): all heads of a token in one program, 16-32 fp32 values per thread."""
    block_h = triton.next_power_of_2(heads)
    return block_h, max(1, min(8, block_h * head_dim // 1024))


def _check_inputs(q, k, q_pos, k_pos, weight_q, weight_k, key_scale, out_q, out_k, norm, rope_axes):
    for name, t in (("q", q), ("k", k), ("out_q", out_q), ("out_k", out_k)):
        check_operand(name, t, "[B, N, H, D]", "q", q, last_dim="head_dim")
        if t.stride(2) != t.shape[3]:
            raise ValueError(f"{name} must hold each token's heads contiguously (stride(2) == head_dim), "
                             f"got strides {t.stride()}")
    if k.dtype != q.dtype or out_q.dtype != q.dtype or out_k.dtype != q.dtype:
        raise ValueError(f"q, k, out_q, out_k must share a dtype, got {q.dtype}, {k.dtype}, {out_q.dtype}, "
                         f"{out_k.dtype}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head_dim")
    if out_q.shape != q.shape or out_k.shape != k.shape:
        raise ValueError(f"out_q/out_k must be shaped like q/k, got {tuple(out_q.shape)}, {tuple(out_k.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS} for the Triton kernel, got {q.shape[-1]}")
    for name, pos, n in (("q_pos", q_pos, q.shape[1]), ("k_pos", k_pos, k.shape[1])):
        if tuple(pos.shape) != (n, 3) or pos.dtype.is_floating_point or pos.dtype.is_complex:
            raise ValueError(f"{name} must be integer [{n}, 3], got {pos.dtype} {tuple(pos.shape)}")
    if (weight_q is None) != (weight_k is None):
        raise ValueError("weight_q and weight_k must both be given (RMSNorm) or both be None")
    for name, w in (("weight_q", weight_q), ("weight_k", weight_k)):
        check_norm(norm, w, q.shape[2], q.shape[3], name)
    rope_bands(q.shape[3], rope_axes)
    if key_scale is not None and tuple(key_scale.shape) != (k.shape[1],):
        raise ValueError(f"key_scale must be [{k.shape[1]}] (one scale per key), got {tuple(key_scale.shape)}")
    check_device(q, "QK prologue")


def launch_args(q, k, q_pos, k_pos, out_q, out_k, *, weight_q=None, weight_k=None, eps=1e-6, q_scale=1.0,
                key_scale=None, theta=10000.0, rope_axes=None, norm="across_heads"):
    """(grid, positional arguments, compile-time metadata) of ``_qk_prologue_fwd`` for one call: shared by the
    launcher and by ``kernels.compile_check``, which compiles exactly what a launch specialises."""
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    t_band, h_band, _ = rope_bands(head_dim, rope_axes)
    device = q.device
    inv_freq = rope_inv_freq(head_dim, theta, rope_axes).to(device=device, dtype=torch.float32)
    has_norm, has_key_scale = weight_q is not None, key_scale is not None
    weight_q = weight_q.contiguous() if has_norm else inv_freq  # unread placeholders when absent
    weight_k = weight_k.contiguous() if has_norm else inv_freq
    key_scale = key_scale.to(device=device, dtype=torch.float32).contiguous() if has_key_scale else inv_freq
    block_h, warps = launch_shape(heads, head_dim)
    rows_q, rows_k = batch * n_q, batch * n_k
    args = (q, k, weight_q, weight_k, q_pos.to(device=device, dtype=torch.int32).contiguous(),
            k_pos.to(device=device, dtype=torch.int32).contiguous(), key_scale, inv_freq, out_q, out_k,
            n_q, n_k, rows_q, rows_k, heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            out_q.stride(0), out_q.stride(1), out_k.stride(0), out_k.stride(1), eps, float(q_scale))
    meta = dict(HEAD_DIM=head_dim, BLOCK_H=block_h, T_PAIRS=t_band // 2, H_PAIRS=h_band // 2, HAS_NORM=has_norm,
                NORM_PER_HEAD=has_norm and norm == "per_head", HAS_KEY_SCALE=has_key_scale,
                EMULATE_BF16=emulate_bf16(q.dtype), num_warps=warps)
    return (max(rows_q, rows_k), 2), args, meta


def qk_prologue_triton(q, k, q_pos, k_pos, *, weight_q=None, weight_k=None, eps=1e-6, q_scale=1.0,
                       key_scale=None, theta=10000.0, out_q=None, out_k=None, rope_axes=None, norm="across_heads"):
    """Launch the prologue on Q and K in one grid; arguments as ``qk_prologue_reference``."""
    out_q = torch.empty_like(q, memory_format=torch.contiguous_format) if out_q is None else out_q
    out_k = torch.empty_like(k, memory_format=torch.contiguous_format) if out_k is None else out_k
    _check_inputs(q, k, q_pos, k_pos, weight_q, weight_k, key_scale, out_q, out_k, norm, rope_axes)
    grid, args, meta = launch_args(q, k, q_pos, k_pos, out_q, out_k, weight_q=weight_q, weight_k=weight_k, eps=eps,
                                   q_scale=q_scale, key_scale=key_scale, theta=theta, rope_axes=rope_axes, norm=norm)
    if grid[0]:
        _qk_prologue_fwd[grid](*args, **meta)
    return out_q, out_k
