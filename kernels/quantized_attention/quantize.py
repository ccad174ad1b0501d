"""Triton kernels that quantise the prologue's 16-bit Q/K (INT8, per-block scales, K smoothed) and V (FP8 e4m3,
per-channel scales, transposed) for the 8-bit attention; semantics of ``reference.quantize_qk_reference`` and
``reference.quantize_v_reference``.

A block scale needs a reduction over a block of tokens of one head and K's smoothing a reduction over every key
of the row, so quantisation is a pass of its own after the prologue (whose programs each hold one token's heads,
for the RMSNorm across heads) and, under Ulysses sequence parallel, after the all-to-all: a rank then holds every
token of its heads, and the mean is the whole sequence's. It is two-phase: ``_column_stats`` reduces fixed token
chunks of each (row, head) to per-channel partial sums (K) or maxima (V) in a [B*H, SPLITS, D] buffer, then the
quantising programs (one per token block and head) combine the SPLITS partials in a fixed order and quantise
their block. SPLITS and the chunks depend on the token count only, so the bits of a batch row do not depend on
the other rows, and there are no atomics. Traffic per element: Q read 2 B + write 1 B; K and V read twice (2 B
each) + write 1 B: at Wan 14B, 480p, 3 references (35,460 tokens x 5,120 channels) 2.4 GB per layer, ~0.8 ms at
3 TB/s, against ~20 TFLOP of attention per layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import AMAX_FLOOR, FP8_MAX, INT8_MAX, QuantizedQK, check_blocks

# token chunks per (row, head) reduced in parallel; fixed, so the reduction order is too. Each quantising program
# re-reads its head's SPLITS x D partials (8 KB at 16, against the 32 KB of its own 128 x 128 bf16 block), and the
# stats pass still has B*H*16 programs (192 at Wan 1.3B, batch 1)
SPLITS = 16
STATS_ROWS = 64  # tokens a stats program loads at once
# what the kernels read as compile-time constants (Triton reads only constexpr globals)
_RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (x + M) - M rounds |x| < 2**22 to an integer, nearest even
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_INT8_MAX = tl.constexpr(float(INT8_MAX))
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _round_e4m3(x, EMULATE: tl.constexpr):
    """fp32 ``x`` (|x| <= 448) to e4m3, nearest even. Triton's interpreter (3.9) rounds ties up and flushes
    subnormals when it casts to fp8: under it (``EMULATE``) the value is rounded on e4m3's grid in fp32 (3
    mantissa bits for |x| >= 2**-6, steps of 2**-9 below) and then cast, which is exact."""
    if EMULATE:
        bits = x.to(tl.uint32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        x = tl.where(tl.abs(x) < 0.015625, (x + 24576.0) - 24576.0, normal)  # 1.5 * 2**14: steps of 2**-9
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    return x.to(tl.float8e4nv)


@triton.jit
def _mma_key_position(n):
    """Where key ``n`` is stored in a row of V^T: the order of ``kernel._mma_key_order`` (within each 16 keys, key
    c = c0 + 2 c1 + 4 c2 + 8 c3 at k = c0 + 2 c3 + 4 c1 + 8 c2), so the FP8 MMA's A operand is P's accumulator
    registers as they are. ``mma_key_positions`` is the same map on the host."""
    return (n & ~15) | (n & 1) | ((n >> 2) & 2) | ((n << 1) & 12)


def mma_key_positions(n: int) -> torch.Tensor:
    """[n] (n a multiple of 16): the column of V^T holding key i (``_mma_key_position``)."""
    keys = torch.arange(n)
    return (keys & ~15) | (keys & 1) | ((keys >> 2) & 2) | ((keys << 1) & 12)


@triton.jit
def _column_stats(X, Partial, n_tokens, chunk, n_heads, stride_xb, stride_xn, HEAD_DIM: tl.constexpr,
                  SPLITS: tl.constexpr, ROWS: tl.constexpr, ABSMAX: tl.constexpr):
    """Partial[bh, split, :] = the sum (or, ``ABSMAX``, the max |x|) over tokens [split*chunk, +chunk) of one
    (row, head) of X [B, N, H, D]."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    batch = (bh // n_heads).to(tl.int64)
    head = bh % n_heads
    base = X + batch * stride_xb + head * HEAD_DIM
    cols = tl.arange(0, HEAD_DIM)
    stat = tl.zeros([HEAD_DIM], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_tokens)
    for start in range(lo, hi, ROWS):
        rows = start + tl.arange(0, ROWS)
        x = tl.load(base + rows[:, None].to(tl.int64) * stride_xn + cols[None, :], mask=(rows < hi)[:, None],
                    other=0.0).to(tl.float32)
        if ABSMAX:
            stat = tl.maximum(stat, tl.max(tl.abs(x), 0))
        else:
            stat += tl.sum(x, 0)
    tl.store(Partial + (bh * SPLITS + split) * HEAD_DIM + cols, stat)


@triton.jit
def _combined(Partial, bh, n_tokens, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, ABSMAX: tl.constexpr):
    """The (row, head)'s per-channel mean (or max |x|) from its SPLITS partials, in a fixed order."""
    cols = tl.arange(0, HEAD_DIM)
    parts = tl.load(Partial + (bh * SPLITS + tl.arange(0, SPLITS))[:, None] * HEAD_DIM + cols[None, :])
    if ABSMAX:
        stat = tl.max(parts, 0)
    else:
        stat = tl.sum(parts, 0) / n_tokens
    return stat


@triton.jit
def _load_block(X, block, bh, n_heads, n_tokens, stride_b, stride_n, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Tokens [block * BLOCK, + BLOCK) of head ``bh % n_heads`` of row ``bh // n_heads`` of X [B, N, H*D], in fp32
    (zeros past the sequence), with their row and column indices, the in-sequence mask, the row and the head."""
    batch = (bh // n_heads).to(tl.int64)
    head = bh % n_heads
    rows = block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    inside = (rows < n_tokens)[:, None]
    x = tl.load(X + batch * stride_b + rows[:, None].to(tl.int64) * stride_n + head * HEAD_DIM + cols[None, :],
                mask=inside, other=0.0).to(tl.float32)
    return x, rows, cols, inside, batch, head


@triton.jit
def _quantize_int8(X, Partial, Out, Scale, Mean, n_tokens, n_heads, n_blocks, stride_xb, stride_xn, stride_ob,
                   stride_on, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
                   SMOOTH: tl.constexpr):
    """One block of BLOCK tokens of one (row, head): x (minus K's mean when ``SMOOTH``) -> int8 codes and the
    block's scale (Scale [B, H, n_blocks]); program 0 of a (row, head) also writes its mean (Mean [B, H, D])."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    x, rows, cols, inside, batch, head = _load_block(X, block, bh, n_heads, n_tokens, stride_xb, stride_xn, HEAD_DIM,
                                                     BLOCK)
    if SMOOTH:
        mean = _combined(Partial, bh, n_tokens, HEAD_DIM, SPLITS, False)
        x = tl.where(inside, x - mean[None, :], 0.0)
        if block == 0:
            tl.store(Mean + bh * HEAD_DIM + cols, mean)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), _AMAX_FLOOR)
    codes = (x * (_INT8_MAX / amax) + _RINT_MAGIC) - _RINT_MAGIC  # |codes| <= 127: integers, nearest even
    tl.store(Out + batch * stride_ob + rows[:, None].to(tl.int64) * stride_on + head * HEAD_DIM + cols[None, :],
             codes.to(tl.int8), mask=inside)
    tl.store(Scale + bh * n_blocks + block, amax / _INT8_MAX)


@triton.jit
def _quantize_v_fp8(V, Partial, OutT, Scale, n_tokens, n_heads, stride_vb, stride_vn, stride_ot,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """One block of BLOCK tokens of one (row, head) of V [B, N, H, D] -> e4m3 codes in OutT [B, H, D, N_pad]
    (transposed: the keys are the reduction axis of P.V, which FP8 MMAs read contiguously; each 16 keys in the
    order ``_mma_key_position``); program 0 of a (row, head) writes its per-channel scales (Scale [B, H, D])."""
    block = tl.program_id(0)
    bh = tl.program_id(1)
    v, rows, cols, inside, batch, head = _load_block(V, block, bh, n_heads, n_tokens, stride_vb, stride_vn, HEAD_DIM,
                                                     BLOCK)
    amax = tl.maximum(_combined(Partial, bh, n_tokens, HEAD_DIM, SPLITS, True), _AMAX_FLOOR)
    codes = _round_e4m3(v * (tl.full([HEAD_DIM], _FP8_MAX, tl.float32) / amax)[None, :], EMULATE_FP8)
    tl.store(OutT + bh.to(tl.int64) * HEAD_DIM * stride_ot + cols[None, :] * stride_ot
             + _mma_key_position(rows)[:, None], codes, mask=inside)
    if block == 0:
        tl.store(Scale + bh * HEAD_DIM + cols, amax / _FP8_MAX)


def block_warps(block: int, head_dim: int) -> int:
    """Warps of a quantising program: 16 fp32 values of its [block, head_dim] tile per thread or fewer (a 128 x 128
    tile on 4 warps holds 235 registers: compile_check)."""
    return max(4, min(8, block * head_dim // 2048))


def _check(name: str, x: torch.Tensor) -> None:
    if x.dim() != 4 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be float16/bfloat16/float32 [B, N, H, D], got {x.dtype} {tuple(x.shape)}")
    if x.stride(3) != 1 or x.stride(2) != x.shape[3]:
        raise ValueError(f"{name} must hold each token's heads contiguously (stride(2) == head_dim, stride(3) == 1), "
                         f"got strides {x.stride()}")


def _stats(x: torch.Tensor, absmax: bool) -> torch.Tensor:
    """[B*H, SPLITS, D] fp32 partial sums (or maxima) of x [B, N, H, D] over fixed token chunks."""
    b, n, h, d = x.shape
    partial = torch.empty(b * h, SPLITS, d, dtype=torch.float32, device=x.device)
    chunk = triton.cdiv(triton.cdiv(max(n, 1), SPLITS), STATS_ROWS) * STATS_ROWS
    _column_stats[(SPLITS, b * h)](x, partial, n, chunk, h, x.stride(0), x.stride(1), HEAD_DIM=d, SPLITS=SPLITS,
                                   ROWS=STATS_ROWS, ABSMAX=absmax, num_warps=4)
    return partial


def _int8_blocks(x, block, partial):
    b, n, h, d = x.shape
    blocks = triton.cdiv(n, block)
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(b, h, blocks, dtype=torch.float32, device=x.device)
    mean = torch.zeros(b, h, d, dtype=torch.float32, device=x.device)
    if blocks:
        smooth = partial is not None
        _quantize_int8[(blocks, b * h)](x, partial if smooth else scale, codes, scale, mean, n, h, blocks,
                                        x.stride(0), x.stride(1), codes.stride(0), codes.stride(1), HEAD_DIM=d,
                                        BLOCK=block, SPLITS=SPLITS, SMOOTH=smooth, num_warps=block_warps(block, d))
    return codes, scale, mean


def quantize_qk_triton(q: torch.Tensor, k: torch.Tensor, *, block_q: int, block_k: int,
                       smooth: bool = True) -> QuantizedQK:
    """``reference.quantize_qk_reference`` in three launches: K's column sums, then Q's and K's blocks."""
    _check("q", q)
    _check("k", k)
    check_blocks(block_q, block_k)
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head_dim")
    q8, q_scale, _ = _int8_blocks(q, block_q, None)
    k8, k_scale, mean = _int8_blocks(k, block_k, _stats(k, absmax=False) if smooth and k.shape[1] else None)
    return QuantizedQK(q8, q_scale, k8, k_scale, mean, block_q, block_k)


def quantize_v_triton(v: torch.Tensor, *, emulate: bool, block: int,
                      tile: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """V [B, N, H, D] -> (e4m3 V^T [B, H, D, N_pad], N_pad the tokens rounded up to ``tile`` (default ``block``: the
    attention's key tile, so its loads never leave the tensor) with zero padding, and fp32 per-channel scales
    [B, H, D]); one program per ``block`` tokens; ``emulate``: round on e4m3's grid first (under the interpreter,
    see ``_round_e4m3``)."""
    _check("v", v)
    tile = block if tile is None else tile
    check_blocks(block, tile)
    b, n, h, d = v.shape
    out_t = torch.zeros(b, h, d, triton.cdiv(max(n, 1), tile) * tile, dtype=torch.float8_e4m3fn, device=v.device)
    scale = torch.empty(b, h, d, dtype=torch.float32, device=v.device)
    if n:
        _quantize_v_fp8[(triton.cdiv(n, block), b * h)](v, _stats(v, absmax=True), out_t, scale, n, h, v.stride(0),
                                                        v.stride(1), out_t.stride(2), HEAD_DIM=d, BLOCK=block,
                                                        SPLITS=SPLITS, EMULATE_FP8=emulate,
                                                        num_warps=block_warps(block, d))
    else:
        scale.fill_(AMAX_FLOOR / FP8_MAX)
    return out_t, scale
