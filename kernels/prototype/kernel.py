"""Triton kernel of ProFashion's PPA (semantics and shapes: ``reference.py``), in two passes.

Pass 1 (row statistics): per (frame, query block), the base-2 log-sum-exp of each query's logits over all
reference tokens. Pass 2 (column accumulation): per (frame, block of token positions t), for every
reference r the column sums of ``exp2(logit - lse)`` over the frame's queries give ``m_f[r, t]`` (written
as token scores); then ``prototype_f[t, :] = sum_r z[r, t, :] * m_f[r, t]`` is accumulated channel block by
channel block. The [queries x reference tokens] probability matrix is never written to memory; the logits
are recomputed in pass 2 instead (2 * Q * R * T * d FLOPs per frame, cheap next to the bytes of z).
Frames are the fastest grid axis so that programs sharing a z tile run together and reuse it from L2.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._common import check_device, check_operand, dot_precision, emulate_bf16, mma, narrow

_LOG2E = 1.4426950408889634
# Tiles on a GPU (BLOCK_D covers the pose dim); chosen from compile_check's ptxas table: no spills at d=64.
GPU_CONFIG = dict(BLOCK_Q=64, BLOCK_T=64, BLOCK_C=64, num_warps=8, num_stages=2)
GPU_CONFIG_FP32 = dict(BLOCK_Q=32, BLOCK_T=32, BLOCK_C=32, num_warps=4, num_stages=1)
INTERPRETER_CONFIG = dict(BLOCK_Q=16, BLOCK_T=16, BLOCK_C=16, num_warps=4, num_stages=1)


@triton.jit
def _load_tile(ptr, rows, n_rows, stride_row, dim, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _ppa_row_stats(Q, K, Lse, n_frames, n_q, n_keys, dim, stride_qb, stride_qf, stride_qn, stride_kb, stride_kn,
                   qk_scale, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_bf = tl.program_id(1)
    batch = pid_bf // n_frames
    frame = pid_bf % n_frames
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q = _load_tile(Q + batch.to(tl.int64) * stride_qb + frame * stride_qf, rows, n_q, stride_qn, dim, BLOCK_D)
    k_ptr = K + batch.to(tl.int64) * stride_kb
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    for start in range(0, n_keys, BLOCK_K):
        keys = start + tl.arange(0, BLOCK_K)
        k = _load_tile(k_ptr, keys, n_keys, stride_kn, dim, BLOCK_D)
        s = mma(q, tl.trans(k), None, DOT_PRECISION, EMULATE_BF16) * qk_scale
        s = tl.where((keys < n_keys)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(Lse + pid_bf.to(tl.int64) * n_q + rows, m_i + tl.math.log2(l_i), mask=rows < n_q)


@triton.jit
def _ppa_columns(Q, K, Z, Lse, Scores, Proto, n_frames, n_q, n_refs, n_tokens, dim, channels,
                 stride_qb, stride_qf, stride_qn, stride_kb, stride_kn, stride_zb, stride_zr, stride_zt,
                 stride_pb, stride_pf, stride_pt, qk_scale, inv_n_q,
                 BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    frame = tl.program_id(0)
    tokens = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    batch = tl.program_id(2)
    pid_bf = batch * n_frames + frame
    token_ok = tokens < n_tokens
    q_ptr = Q + batch.to(tl.int64) * stride_qb + frame * stride_qf
    lse_ptr = Lse + pid_bf.to(tl.int64) * n_q
    scores_ptr = Scores + pid_bf.to(tl.int64) * n_refs * n_tokens

    # 1. token scores m_f[r, t] = mean over the frame's queries of p(query, r * T + t)
    for ref in range(n_refs):
        k = _load_tile(K + batch.to(tl.int64) * stride_kb + ref * n_tokens * stride_kn, tokens, n_tokens,
                       stride_kn, dim, BLOCK_D)
        col = tl.zeros([BLOCK_T], tl.float32)
        for q_start in range(0, n_q, BLOCK_Q):
            rows = q_start + tl.arange(0, BLOCK_Q)
            q = _load_tile(q_ptr, rows, n_q, stride_qn, dim, BLOCK_D)
            lse = tl.load(lse_ptr + rows, mask=rows < n_q, other=float("inf"))
            s = mma(q, tl.trans(k), None, DOT_PRECISION, EMULATE_BF16) * qk_scale
            col += tl.sum(tl.math.exp2(s - lse[:, None]), 0)
        tl.store(scores_ptr + ref * n_tokens + tokens, col * inv_n_q, mask=token_ok)
    tl.debug_barrier()  # the scores just written by this program's threads are read back below

    # 2. prototype_f[t, c] = sum_r z[r, t, c] * m_f[r, t], one channel block at a time
    z_ptr = Z + batch.to(tl.int64) * stride_zb
    p_ptr = Proto + batch.to(tl.int64) * stride_pb + frame.to(tl.int64) * stride_pf
    for c_start in range(0, channels, BLOCK_C):
        cols = c_start + tl.arange(0, BLOCK_C)
        mask = token_ok[:, None] & (cols < channels)[None, :]
        acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        for ref in range(n_refs):
            m = tl.load(scores_ptr + ref * n_tokens + tokens, mask=token_ok, other=0.0)
            z = tl.load(z_ptr + ref * stride_zr + tokens[:, None] * stride_zt + cols[None, :], mask=mask, other=0.0)
            acc += z.to(tl.float32) * m[:, None]
        out = narrow(acc, Proto.dtype.element_ty, EMULATE_BF16).to(Proto.dtype.element_ty)
        tl.store(p_ptr + tokens[:, None] * stride_pt + cols[None, :], out, mask=mask)


def _check_inputs(pose_q, pose_k, ref_feats):
    for name, t, layout in (("pose_q", pose_q, "[B, F, Q, d]"), ("pose_k", pose_k, "[B, R*T, d]"),
                            ("ref_feats", ref_feats, "[B, R, T, C]")):
        check_operand(name, t, layout, "pose_q", pose_q)
    batch, _, n_q, dim = pose_q.shape
    _, n_refs, n_tokens, _ = ref_feats.shape
    if pose_k.dtype != pose_q.dtype:
        raise ValueError(f"pose_q and pose_k must share a dtype, got {pose_q.dtype} and {pose_k.dtype}")
    if tuple(pose_k.shape) != (batch, n_refs * n_tokens, dim):
        raise ValueError(f"pose_k must be [B, R*T, d] = {(batch, n_refs * n_tokens, dim)} for pose_q "
                         f"{tuple(pose_q.shape)} and ref_feats {tuple(ref_feats.shape)}, got {tuple(pose_k.shape)}")
    if ref_feats.shape[0] != batch or min(n_q, n_refs, n_tokens, ref_feats.shape[-1], pose_q.shape[1]) < 1:
        raise ValueError(f"need matching batch and non-empty frames, queries, references, tokens and channels, "
                         f"got pose_q {tuple(pose_q.shape)} and ref_feats {tuple(ref_feats.shape)}")
    if dim > 256:
        raise ValueError(f"the pose dim must be at most 256 for the Triton kernel, got {dim}")
    check_device(pose_q, "prototype aggregation")


def prototype_aggregate_triton(pose_q, pose_k, ref_feats, *, sm_scale=None, config=None):
    """Launch both passes; returns (prototype, token_scores, view_scores) like the reference."""
    _check_inputs(pose_q, pose_k, ref_feats)
    batch, n_frames, n_q, dim = pose_q.shape
    _, n_refs, n_tokens, channels = ref_feats.shape
    if config is None and not pose_q.is_cuda:
        config = INTERPRETER_CONFIG
    config = config or (GPU_CONFIG_FP32 if pose_q.dtype == torch.float32 else GPU_CONFIG)
    block_q, block_t, block_c = config["BLOCK_Q"], config["BLOCK_T"], config["BLOCK_C"]
    launch = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    consts = dict(BLOCK_D=max(16, triton.next_power_of_2(dim)), DOT_PRECISION=dot_precision(pose_q.dtype),
                  EMULATE_BF16=emulate_bf16(pose_q.dtype))
    qk_scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(dim)) * _LOG2E
    device = pose_q.device
    lse = torch.empty(batch, n_frames, n_q, device=device, dtype=torch.float32)
    scores = torch.empty(batch, n_frames, n_refs, n_tokens, device=device, dtype=torch.float32)
    proto = torch.empty(batch, n_frames, n_tokens, channels, device=device, dtype=ref_feats.dtype)
    _ppa_row_stats[(triton.cdiv(n_q, block_q), batch * n_frames)](
        pose_q, pose_k, lse, n_frames, n_q, n_refs * n_tokens, dim, *pose_q.stride()[:3], *pose_k.stride()[:2],
        qk_scale, BLOCK_Q=block_q, BLOCK_K=block_t, **consts, **launch)
    _ppa_columns[(n_frames, triton.cdiv(n_tokens, block_t), batch)](
        pose_q, pose_k, ref_feats, lse, scores, proto, n_frames, n_q, n_refs, n_tokens, dim, channels,
        *pose_q.stride()[:3], *pose_k.stride()[:2], *ref_feats.stride()[:3], *proto.stride()[:3], qk_scale,
        1.0 / n_q, BLOCK_Q=block_q, BLOCK_T=block_t, BLOCK_C=block_c, **consts, **launch)
    return proto, scores, scores.sum(-1)
