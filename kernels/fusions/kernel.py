"""Triton kernels of the small fusions: one program per token row, the whole channel dim in registers.

Each kernel reads its inputs once and writes its output once (the unfused PyTorch code makes a float32
copy and several intermediate passes). Semantics are those of ``reference.py``; fp32 arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import MMA_DTYPES, check_device, emulate_bf16, narrow

MAX_CHANNELS = 32768


@triton.jit
def _load_row(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_row(ptr, offs, mask, y, EMULATE_BF16: tl.constexpr):
    tl.store(ptr + offs, narrow(y, ptr.dtype.element_ty, EMULATE_BF16).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mean_var(x, mask, n):
    mean = tl.sum(x, 0) / n
    centred = tl.where(mask, x - mean, 0.0)
    return mean, centred, tl.sum(centred * centred, 0) / n


@triton.jit
def _adaln_layernorm_fwd(X, Shift, Scale, Out, n_tokens, channels, stride_sb, stride_sn, stride_cb, stride_cn, eps,
                         BLOCK_C: tl.constexpr, EMULATE_BF16: tl.constexpr):
    row = tl.program_id(0)
    batch = row // n_tokens
    token = row % n_tokens
    offs = tl.arange(0, BLOCK_C)
    mask = offs < channels
    x = _load_row(X + row.to(tl.int64) * channels, offs, mask)
    _, centred, var = _mean_var(x, mask, channels)
    shift = _load_row(Shift + batch.to(tl.int64) * stride_sb + token.to(tl.int64) * stride_sn, offs, mask)
    scale = _load_row(Scale + batch.to(tl.int64) * stride_cb + token.to(tl.int64) * stride_cn, offs, mask)
    y = centred / tl.sqrt_rn(var + eps) * (1.0 + scale) + shift
    _store_row(Out + row.to(tl.int64) * channels, offs, mask, y, EMULATE_BF16)


@triton.jit
def _gated_residual_fwd(X, Y, Gate, Out, n_tokens, channels, stride_gb, stride_gn,
                        BLOCK_C: tl.constexpr, EMULATE_BF16: tl.constexpr):
    row = tl.program_id(0)
    batch = row // n_tokens
    token = row % n_tokens
    offs = tl.arange(0, BLOCK_C)
    mask = offs < channels
    base = row.to(tl.int64) * channels
    gate = _load_row(Gate + batch.to(tl.int64) * stride_gb + token.to(tl.int64) * stride_gn, offs, mask)
    y = _load_row(X + base, offs, mask) + _load_row(Y + base, offs, mask) * gate
    _store_row(Out + base, offs, mask, y, EMULATE_BF16)


@triton.jit
def _distribution_fusion_fwd(A, B, Out, channels, eps, BLOCK_C: tl.constexpr, EMULATE_BF16: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * channels
    offs = tl.arange(0, BLOCK_C)
    mask = offs < channels
    a = _load_row(A + base, offs, mask)
    b = _load_row(B + base, offs, mask)
    _, centred_a, var_a = _mean_var(a, mask, channels)
    mean_b, _, var_b = _mean_var(b, mask, channels)
    y = centred_a * (tl.sqrt_rn(var_b + eps) / tl.sqrt_rn(var_a + eps)) + mean_b + b
    _store_row(Out + base, offs, mask, y, EMULATE_BF16)


# --- launchers ------------------------------------------------------------------------------------------
def block_and_warps(channels: int) -> tuple[int, int]:
    """BLOCK_C covering the row and a warp count giving each thread 8-32 elements."""
    block = triton.next_power_of_2(channels)
    return block, max(1, min(8, block // 512))


def _check_main(name: str, x: torch.Tensor, dims: int | None = None) -> None:
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(x.shape)}")
    if x.dtype not in MMA_DTYPES:
        raise ValueError(f"{name} dtype must be one of float16/bfloat16/float32, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {x.stride()} for shape {tuple(x.shape)}")
    if x.shape[-1] > MAX_CHANNELS or x.numel() == 0:
        raise ValueError(f"{name} must be non-empty with at most {MAX_CHANNELS} channels, got {tuple(x.shape)}")
    check_device(x, "fusion")


def _check_like(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.shape != x.shape or t.device != x.device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor of shape {tuple(x.shape)} on {x.device}, got "
                         f"{tuple(t.shape)} on {t.device}")


def _row_param(name: str, p: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A per-(batch, token) channel vector broadcast to x [B, N, C]: (tensor, stride_b, stride_n)."""
    try:
        expanded = p.expand(x.shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(p.shape)} does not broadcast to {tuple(x.shape)}") from None
    if p.shape[-1] != x.shape[-1] or expanded.stride(-1) != 1 or p.device != x.device:
        raise ValueError(f"{name} must hold {x.shape[-1]} contiguous channels on {x.device}, got shape "
                         f"{tuple(p.shape)}, strides {p.stride()} on {p.device}")
    return expanded, expanded.stride(0), expanded.stride(1)


def adaln_layernorm_triton(x, shift, scale, *, eps=1e-6):
    if x.dim() == 3 and x.numel() == 0:  # a stream without tokens (no references): nothing to launch
        return torch.empty_like(x)
    _check_main("x", x, dims=3)
    shift, sb, sn = _row_param("shift", shift, x)
    scale, cb, cn = _row_param("scale", scale, x)
    batch, tokens, channels = x.shape
    out = torch.empty_like(x)
    block, warps = block_and_warps(channels)
    _adaln_layernorm_fwd[(batch * tokens,)](x, shift, scale, out, tokens, channels, sb, sn, cb, cn, eps,
                                            BLOCK_C=block, EMULATE_BF16=emulate_bf16(x.dtype), num_warps=warps)
    return out


def gated_residual_triton(x, y, gate):
    if x.dim() == 3 and x.numel() == 0 and y.shape == x.shape:  # a stream without tokens: nothing to launch
        return torch.empty_like(x)
    _check_main("x", x, dims=3)
    _check_like("y", y, x)
    gate, gb, gn = _row_param("gate", gate, x)
    batch, tokens, channels = x.shape
    out = torch.empty_like(x)
    block, warps = block_and_warps(channels)
    _gated_residual_fwd[(batch * tokens,)](x, y, gate, out, tokens, channels, gb, gn, BLOCK_C=block,
                                           EMULATE_BF16=emulate_bf16(x.dtype), num_warps=warps)
    return out


def distribution_fusion_triton(za, zb, *, eps=1e-6):
    _check_main("za", za)
    _check_main("zb", zb)
    _check_like("za", za, zb)
    out = torch.empty_like(zb)
    block, warps = block_and_warps(zb.shape[-1])
    _distribution_fusion_fwd[(zb.numel() // zb.shape[-1],)](za, zb, out, zb.shape[-1], eps, BLOCK_C=block,
                                                            EMULATE_BF16=emulate_bf16(zb.dtype),
                                                            num_warps=warps)
    return out
