"""Triton kernel of the batch-invariant linear ``x @ weight.T + bias``: a persistent matmul whose every output row
is computed by the same instructions whatever the number of rows M.

cuBLAS picks its kernel, tiles and split-K by M, so under dynamic batching a request's bits depend on the
requests batched with it. Here:
  - the tiles come from the dtype and the GPU generation only (``tile_config``), never from M (no autotune);
  - K is never split: each output tile is reduced from k = 0 to K, one BLOCK_K slab after the other, into one
    fp32 accumulator, the bias added at the end, one rounding at the store;
  - M is a runtime integer the JIT does not specialise on (M == 1 or M % 16 == 0 would compile other binaries);
  - min(#SMs, #tiles) programs walk the output tiles; which program computes a tile, and when, changes no bits.
Rows past M and columns past N read row/column 0 (clamped) and are never stored, so A and B loads have no mask
along M or N; K's tail is masked only when BLOCK_K does not divide K (``EVEN_K``, a function of K).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._common import MMA_DTYPES, check_device, check_operand, dot_precision, emulate_bf16, interpreting, narrow
from .reference import check_linear

# Per (16-bit?, GPU major); no split-K anywhere. 16-bit: 128x128 output tiles on tensor cores, wgmma on Hopper with
# 64-wide K slabs over 3 stages (128 KiB of shared memory), mma.sync before with 32-wide slabs over 4 stages (80 KiB,
# under sm_86/89's 99 KiB). fp32 takes IEEE products on CUDA cores (``dot_precision``) on 64x64 tiles. From
# ``kernels.compile_check``: 152 (sm_90) / 182 (sm_80) registers for 16-bit, 128 / 168 for fp32, no spills.
GPU_CONFIGS = {
    (True, 9): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    (True, 8): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
    (False, 9): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    (False, 8): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
}
# Under the interpreter: tiles small enough for tiny test shapes to cover several tiles, tails and a K tail, and
# few programs, so that each walks several tiles.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
INTERPRETER_PROGRAMS = 4


@triton.jit
def _tile_coords(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles sweep the column tiles together, so each weight tile is reused from L2."""
    width = GROUP_M * tiles_n
    first_m = (tile // width) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % width) % group_m, (tile % width) // group_m


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """``tl.dot(a, b, acc)``. The interpreter's ``tl.dot`` is numpy's BLAS, whose micro-kernels round a row by its
    position in the tile; there each product is formed alone in fp32 (bf16 included, which the interpreter cannot
    multiply) and summed along K in order, so that every row is computed alike, as the GPU's MMA computes it."""
    if INTERPRETED:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], 1)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=["M"])
def _batch_invariant_linear_fwd(X, W, Bias, Out, M, N, K, stride_xm, stride_wn, stride_om,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                                DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, INTERPRETED: tl.constexpr):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    out_ty = Out.dtype.element_ty
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0), flatten=True):
        pid_m, pid_n = _tile_coords(tile, tiles_m, tiles_n, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        x_ptrs = X + tl.where(rows < M, rows, 0).to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
        w_ptrs = W + tl.where(cols < N, cols, 0).to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):  # one order, no split: the same for every row whatever M
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = _dot(a, b, acc, DOT_PRECISION, INTERPRETED)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        out_ptrs = Out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(out_ptrs, narrow(acc, out_ty, EMULATE_BF16).to(out_ty),
                 mask=(rows < M)[:, None] & (cols < N)[None, :])


def tile_config(dtype: torch.dtype, major: int) -> dict:
    """The launch configuration on a GPU of compute capability ``major``.x: a function of the dtype and the GPU
    only, never of the shape (a config chosen by M would make the rows' bits depend on the batch)."""
    return dict(GPU_CONFIGS[(dtype != torch.float32, 9 if major >= 9 else 8)])


def launch_args(x2, weight, bias, out2, config):
    """(positional arguments, compile-time metadata) of ``_batch_invariant_linear_fwd`` for x2 [M, K] and out2
    [M, N]: shared by the launcher and by ``kernels.compile_check``, which compiles exactly what a launch
    specialises."""
    m, k = x2.shape
    args = (x2, weight, weight if bias is None else bias, out2, m, weight.shape[0], k,  # weight: an unread bias
            x2.stride(0), weight.stride(0), out2.stride(0))
    meta = {name: config[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")}
    meta |= dict(HAS_BIAS=bias is not None, EVEN_K=k % config["BLOCK_K"] == 0,
                 DOT_PRECISION=dot_precision(x2.dtype), EMULATE_BF16=emulate_bf16(x2.dtype), INTERPRETED=interpreting())
    return args, meta


def _check_inputs(x, weight, bias, out):
    check_linear(x, weight, bias)
    if x.dtype not in MMA_DTYPES:
        raise ValueError(f"x dtype must be one of float16/bfloat16/float32, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"x must be contiguous in K (stride(-1) == 1), got strides {x.stride()}")
    check_operand("weight", weight, "[N, K]", "x", x, last_dim="K")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must be x's dtype {x.dtype}")
    if bias is not None:
        check_operand("bias", bias, "[N]", "x", x, last_dim="N")
    if out is not None:
        want = (*x.shape[:-1], weight.shape[0])
        if tuple(out.shape) != want or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out must be {x.dtype} {want} on {x.device}, got {out.dtype} {tuple(out.shape)} "
                             f"on {out.device}")
        if out.stride(-1) != 1 or not _viewable(out, weight.shape[0]):
            raise ValueError(f"out must be viewable as [rows, N] with stride(-1) == 1, got strides {out.stride()}")
    check_device(x, "batch-invariant linear")


def _viewable(t: torch.Tensor, n: int) -> bool:
    try:
        t.view(math.prod(t.shape[:-1]), n)
    except RuntimeError:
        return False
    return True


def _programs(device: torch.device, tiles: int) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else \
        INTERPRETER_PROGRAMS
    return min(sms, tiles)


def batch_invariant_linear_triton(x, weight, bias=None, *, out=None, config=None):
    """``x @ weight.T + bias`` for x [..., K] (leading dims flattened into M rows), weight [N, K], bias [N] or
    None; returns [..., N] in x's dtype, or writes ``out``. ``config``: a tile override for tests only (keys of
    ``GPU_CONFIGS``' values); by default ``tile_config`` on a GPU and ``INTERPRETER_CONFIG`` interpreted."""
    _check_inputs(x, weight, bias, out)
    k, n = x.shape[-1], weight.shape[0]
    m = math.prod(x.shape[:-1])
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if config is None:
        config = INTERPRETER_CONFIG if interpreting() else tile_config(
            x.dtype, torch.cuda.get_device_capability(x.device)[0])
    x2, out2 = x.reshape(m, k), out.view(m, n)
    tiles = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
    if tiles:
        args, meta = launch_args(x2, weight, bias, out2, config)
        _batch_invariant_linear_fwd[(_programs(x.device, tiles),)](*args, **meta)
    return out
