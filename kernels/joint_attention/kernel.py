"""Triton kernel of the joint attention: flash-style online softmax with in-kernel Wan RoPE.

Semantics are those of ``reference.joint_attention_reference``. Per program: one (batch, head, query block).
Q is rotated once per program, each K tile is rotated as it is loaded; the rotated values live in registers
only. Interleaved pairs (x[2j], x[2j+1]) are split into an even and an odd half, so the rotated dot
product is ``q_even @ k_even^T + q_odd @ k_odd^T`` (two MMAs of depth D/2, no re-interleaving).

The key loop of a query block is cut into ranges decided from indices (no mask tensor):
  range A: keys every query of the block may see; only its last tile checks bounds;
  range B: keys the mask decides per element (prototype tokens of the block's frames, or the video keys of
           a block that straddles the video/reference boundary in ``isolated`` mode).
Casts to the MMA dtype go through ``narrow`` (see ``kernels._common`` for the interpreter's bf16 emulation).
Fully masked rows (possible only with degenerate arguments) give 0 where the reference gives NaN.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from .._common import check_device, check_operand, dot_precision, emulate_bf16, mma, narrow
from ..rope import rope_bands, rope_inv_freq

MASK_IDS = {"full": 0, "isolated": 1, "prototype": 2}
HEAD_DIMS = (64, 128)
_LOG2E = 1.4426950408889634


@triton.jit
def _rope_rotate(x, pos_ptr, offs, n, inv_freq_ptr, ROWS: tl.constexpr,
                 HALF: tl.constexpr, T_PAIRS: tl.constexpr, H_PAIRS: tl.constexpr, FAST_TRIG: tl.constexpr):
    """Rotate a tile x [BLOCK, 2*HALF] by the RoPE angles of rows ``offs``; returns (even, odd) in fp32."""
    x_even, x_odd = tl.split(tl.reshape(x.to(tl.float32), (ROWS, HALF, 2)))
    valid = offs < n
    pos_t = tl.load(pos_ptr + offs * 3 + 0, mask=valid, other=0).to(tl.float32)
    pos_h = tl.load(pos_ptr + offs * 3 + 1, mask=valid, other=0).to(tl.float32)
    pos_w = tl.load(pos_ptr + offs * 3 + 2, mask=valid, other=0).to(tl.float32)
    pair = tl.arange(0, HALF)[None, :]
    pos = tl.where(pair < T_PAIRS, pos_t[:, None], tl.where(pair < T_PAIRS + H_PAIRS, pos_h[:, None], pos_w[:, None]))
    angle = pos * tl.load(inv_freq_ptr + tl.arange(0, HALF))[None, :]
    if FAST_TRIG:
        cos = libdevice.fast_cosf(angle)
        sin = libdevice.fast_sinf(angle)
    else:
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    return x_even * cos - x_odd * sin, x_even * sin + x_odd * cos


@triton.jit
def _attn_range(acc, l_i, m_i, q_even, q_odd, q_idx,
                k_ptr, v_ptr, k_pos_ptr, key_scale_ptr, inv_freq_ptr, stride_kn, stride_vn,
                qk_scale, n_video_q, n_video_k, tokens_per_frame, proto_tokens, lo, hi,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, T_PAIRS: tl.constexpr, H_PAIRS: tl.constexpr,
                BOUNDS: tl.constexpr, MASK_MODE: tl.constexpr, HAS_KEY_SCALE: tl.constexpr,
                FAST_TRIG: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with the keys [lo, hi); logits are in base 2."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < hi
        if BOUNDS:
            k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :])
        k_even, k_odd = _rope_rotate(k, k_pos_ptr, offs_n, hi, inv_freq_ptr, BLOCK_N,
                                     HEAD_DIM // 2, T_PAIRS, H_PAIRS, FAST_TRIG)
        k_even = narrow(k_even, k.dtype, EMULATE_BF16)
        k_odd = narrow(k_odd, k.dtype, EMULATE_BF16)
        qk = mma(q_even, tl.trans(k_even), None, DOT_PRECISION, EMULATE_BF16)
        qk = mma(q_odd, tl.trans(k_odd), qk, DOT_PRECISION, EMULATE_BF16)
        if HAS_KEY_SCALE:
            key_scale = tl.load(key_scale_ptr + offs_n, mask=valid, other=1.0)
            qk = qk * (key_scale * qk_scale)[None, :]
        else:
            qk = qk * qk_scale
        if MASK_MODE == 1:  # isolated: reference queries see reference keys only
            allowed = (q_idx[:, None] < n_video_q) | (offs_n[None, :] >= n_video_k)
            qk = tl.where(allowed & valid[None, :], qk, float("-inf"))
        elif MASK_MODE == 2:  # prototype: video query of frame f sees video keys + frame f's prototype
            k_other = offs_n[None, :] >= n_video_k
            own_frame = k_other & ((offs_n[None, :] - n_video_k) // proto_tokens
                                   == (q_idx // tokens_per_frame)[:, None])
            allowed = tl.where(q_idx[:, None] < n_video_q, (~k_other) | own_frame, k_other)
            qk = tl.where(allowed & valid[None, :], qk, float("-inf"))
        elif BOUNDS:
            qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(narrow(p, v.dtype, EMULATE_BF16), v, acc * alpha[:, None], DOT_PRECISION, EMULATE_BF16)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _joint_attention_fwd(
    Q, K, V, Out, QPos, KPos, KeyScale, InvFreq,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_ob, stride_on, stride_oh,
    n_heads, n_q, n_k, n_video_q, n_video_k, tokens_per_frame, proto_tokens, qk_scale,
    HEAD_DIM: tl.constexpr, T_PAIRS: tl.constexpr, H_PAIRS: tl.constexpr, MASK_MODE: tl.constexpr,
    HAS_KEY_SCALE: tl.constexpr, FAST_TRIG: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    q_ptr = Q + batch.to(tl.int64) * stride_qb + head * stride_qh
    k_ptr = K + batch.to(tl.int64) * stride_kb + head * stride_kh
    v_ptr = V + batch.to(tl.int64) * stride_vb + head * stride_vh
    o_ptr = Out + batch.to(tl.int64) * stride_ob + head * stride_oh

    # 1. load and rotate the query block once; fold nothing into it (scales are applied to fp32 logits)
    m_first = pid_m * BLOCK_M
    q_idx = m_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_valid = q_idx < n_q
    q = tl.load(q_ptr + q_idx[:, None] * stride_qn + offs_d[None, :], mask=q_valid[:, None], other=0.0)
    q_even, q_odd = _rope_rotate(q, QPos, q_idx, n_q, InvFreq, BLOCK_M, HEAD_DIM // 2, T_PAIRS, H_PAIRS, FAST_TRIG)
    q_even = narrow(q_even, q.dtype, EMULATE_BF16)
    q_odd = narrow(q_odd, q.dtype, EMULATE_BF16)

    # 2. key ranges of this block (A: dense, B: masked per element), from indices only
    m_last = tl.minimum(m_first + BLOCK_M, n_q) - 1
    a_lo = 0
    a_hi = n_k
    b_lo = 0
    b_hi = 0
    if MASK_MODE == 1:
        if m_first >= n_video_q:
            a_lo = n_video_k
        elif m_last >= n_video_q:
            a_lo = n_video_k
            b_hi = n_video_k
    elif MASK_MODE == 2:
        if m_first >= n_video_q:
            a_lo = n_video_k
        elif m_last < n_video_q:
            a_hi = n_video_k
            b_lo = n_video_k + (m_first // tokens_per_frame) * proto_tokens
            b_hi = tl.minimum(n_k, n_video_k + (m_last // tokens_per_frame + 1) * proto_tokens)
        else:
            a_hi = 0
            b_hi = n_k
    a_full = a_lo + tl.maximum(a_hi - a_lo, 0) // BLOCK_N * BLOCK_N

    # 3. online softmax over the ranges
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _attn_range(acc, l_i, m_i, q_even, q_odd, q_idx, k_ptr, v_ptr, KPos, KeyScale, InvFreq,
                                stride_kn, stride_vn, qk_scale, n_video_q, n_video_k, tokens_per_frame,
                                proto_tokens, a_lo, a_full, BLOCK_N, HEAD_DIM, T_PAIRS, H_PAIRS,
                                False, 0, HAS_KEY_SCALE, FAST_TRIG, DOT_PRECISION, EMULATE_BF16)
    acc, l_i, m_i = _attn_range(acc, l_i, m_i, q_even, q_odd, q_idx, k_ptr, v_ptr, KPos, KeyScale, InvFreq,
                                stride_kn, stride_vn, qk_scale, n_video_q, n_video_k, tokens_per_frame,
                                proto_tokens, a_full, a_hi, BLOCK_N, HEAD_DIM, T_PAIRS, H_PAIRS,
                                True, 0, HAS_KEY_SCALE, FAST_TRIG, DOT_PRECISION, EMULATE_BF16)
    if MASK_MODE != 0:
        acc, l_i, m_i = _attn_range(acc, l_i, m_i, q_even, q_odd, q_idx, k_ptr, v_ptr, KPos, KeyScale, InvFreq,
                                    stride_kn, stride_vn, qk_scale, n_video_q, n_video_k, tokens_per_frame,
                                    proto_tokens, b_lo, b_hi, BLOCK_N, HEAD_DIM, T_PAIRS, H_PAIRS,
                                    True, MASK_MODE, HAS_KEY_SCALE, FAST_TRIG, DOT_PRECISION, EMULATE_BF16)

    # 4. normalise and store (fully masked rows give 0)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = narrow(acc / l_safe[:, None], Out.dtype.element_ty, EMULATE_BF16)
    tl.store(o_ptr + q_idx[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=q_valid[:, None])


# --- autotuning ------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages); every entry is compiled for sm_80 and sm_90 by compile_check,
# whose ptxas table is the basis of the pruning below (RoPE'd K tiles in fp32 raise register pressure).
AUTOTUNE_CONFIGS = [
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 32, 8, 3),
    (64, 64, 4, 3),
    (64, 32, 4, 4),
    (32, 32, 4, 2),
]
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16)


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs that fit the problem and the register budget of the head dim and precision.

    fp32 (IEEE products on CUDA cores) spills beyond 32x32 tiles; at head_dim 128 the 64x64 tile spills
    over 1 KB, the others at most ~100 B; tiles far taller than the query count only waste work.
    """
    head_dim, ieee = kwargs["HEAD_DIM"], kwargs["DOT_PRECISION"] == "ieee"

    def fits(c):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if ieee:
            return m * n <= 32 * 32
        return m * n > 32 * 32 and not (head_dim == 128 and (m, n) == (64, 64)) \
            and m <= max(64, triton.next_power_of_2(named_args["n_q"]))

    return [c for c in configs if fits(c)] or configs[-1:]


_joint_attention_tuned = triton.autotune(
    configs=[triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in AUTOTUNE_CONFIGS],
    key=["n_q", "n_k", "HEAD_DIM", "MASK_MODE", "HAS_KEY_SCALE", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_joint_attention_fwd)


# --- launcher ---------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, q_pos, k_pos, key_scale, out, n_video_q, n_video_k, mask, tokens_per_frame,
                  proto_tokens):
    if mask not in MASK_IDS:
        raise ValueError(f"mask must be one of {tuple(MASK_IDS)}, got {mask!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_operand(name, t, "[B, N, H, D]", "q", q, last_dim="head_dim")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, n_q, heads, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS} for the Triton kernel, got {head_dim}")
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k and v must be [B, Nk, H, D] matching q {tuple(q.shape)}, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    n_k = k.shape[1]
    for name, pos, n in (("q_pos", q_pos, n_q), ("k_pos", k_pos, n_k)):
        if tuple(pos.shape) != (n, 3) or pos.dtype.is_floating_point or pos.dtype.is_complex:
            raise ValueError(f"{name} must be integer [{n}, 3], got {pos.dtype} {tuple(pos.shape)}")
    if key_scale is not None and tuple(key_scale.shape) != (n_k,):
        raise ValueError(f"key_scale must be [{n_k}] (one scale per key), got {tuple(key_scale.shape)}")
    if not (0 <= n_video_q <= n_q and 0 <= n_video_k <= n_k):
        raise ValueError(f"need 0 <= n_video_q <= {n_q} and 0 <= n_video_k <= {n_k}, "
                         f"got n_video_q={n_video_q}, n_video_k={n_video_k}")
    if tokens_per_frame < 1 or proto_tokens < 1:
        raise ValueError(f"tokens_per_frame and proto_tokens must be >= 1, got {tokens_per_frame}, {proto_tokens}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device} with "
                         f"stride(-1) == 1, got {out.dtype} {tuple(out.shape)} on {out.device}")
    check_device(q, "joint attention")


def joint_attention_triton(q, k, v, q_pos, k_pos, *, n_video_q, n_video_k, key_scale=None, mask="full",
                           tokens_per_frame=1, proto_tokens=1, theta=10000.0, sm_scale=None, out=None,
                           config=None):
    """Launch the fused kernel; arguments as ``joint_attention_reference``, plus ``out`` (written in place)
    and ``config`` (dict(BLOCK_M=, BLOCK_N=, num_warps=, num_stages=) to bypass autotuning)."""
    _check_inputs(q, k, v, q_pos, k_pos, key_scale, out, n_video_q, n_video_k, mask, tokens_per_frame,
                  proto_tokens)
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    t_band, h_band, _ = rope_bands(head_dim)
    inv_freq = rope_inv_freq(head_dim, theta).to(device=q.device, dtype=torch.float32)
    q_pos = q_pos.to(device=q.device, dtype=torch.int32).contiguous()
    k_pos = k_pos.to(device=q.device, dtype=torch.int32).contiguous()
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    has_key_scale = key_scale is not None
    key_scale = key_scale.to(device=q.device, dtype=torch.float32).contiguous() if has_key_scale else inv_freq
    fp32 = q.dtype == torch.float32
    args = (q, k, v, out, q_pos, k_pos, key_scale, inv_freq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], heads, n_q, n_k, n_video_q, n_video_k, tokens_per_frame, proto_tokens,
            scale * _LOG2E)
    meta = dict(HEAD_DIM=head_dim, T_PAIRS=t_band // 2, H_PAIRS=h_band // 2, MASK_MODE=MASK_IDS[mask],
                HAS_KEY_SCALE=has_key_scale, FAST_TRIG=q.is_cuda and not fp32,
                DOT_PRECISION=dot_precision(q.dtype), EMULATE_BF16=emulate_bf16(q.dtype))
    if config is None and not q.is_cuda:
        config = INTERPRETER_CONFIG
    if config is None:
        def grid(m):
            return (triton.cdiv(n_q, m["BLOCK_M"]), batch * heads)
        _joint_attention_tuned[grid](*args, **meta)
    else:
        grid = (triton.cdiv(n_q, config["BLOCK_M"]), batch * heads)
        _joint_attention_fwd[grid](*args, **meta, **config)
    return out
