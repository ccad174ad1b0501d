"""Triton kernel of the joint attention on pre-rotated Q/K (flash-style online softmax, base-2 logits).

Semantics are those of ``reference.rotated_attention_reference``: Q and K come out of the QK prologue
(``kernels.qk_prologue``) rotated, with the softmax scale times log2(e) folded into Q and each key's logit
multiplier folded into K, so the loop body is the plain flash loop: one MMA for the logits, one subtract of
the running maximum, exp2, one MMA for the values. No trigonometry and no scale multiply in the loop.

Streams are given by offsets (``reference``): queries video ``[0, q_ref_lo)``, reference ``[q_ref_lo,
q_ctx_lo)``, context ``[q_ctx_lo, n_q)``, keys likewise at ``k_ref_lo``/``k_ctx_lo``. With ``HAS_KEY_LEN`` a
program's batch row sees keys ``[0, min(n_k, KeyLen[batch]))`` only (the padded text tail of the context).

Per program: one (batch, head, query block). The key loop of a block is cut into ranges decided from indices
(no mask tensor):
  range A: keys every query of the block may see (all keys of the row; the reference keys for a block of
           reference queries under ``isolated``; the video keys of a video block under ``prototype``); only
           its last tile checks bounds;
  ranges B, C: keys the mask decides per element (under ``prototype``, the prototype tokens of the block's
           frames (B) and the context keys (C); under ``isolated``, for a block mixing reference queries with
           others, the video keys (B) and the context keys (C), while A holds the reference keys, which every
           query sees).
Two ways in, one loop body: ``_attention_fwd_tma`` reads Q/K/V/Out through host-side tensor descriptors
([B, N, H*D] views: TMA on sm_90, plain loads elsewhere; rows past a batch's sequence are zero-filled and
clipped per batch), ``_attention_fwd`` through pointers and strides (the TensorRT plugin and the AOT
library, whose launchers pass raw pointers). Casts to the MMA dtype go through ``narrow`` (see
``kernels._common`` for the interpreter's bf16 emulation). Fully masked rows give 0 where the reference
gives NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import check_device, check_operand, dot_precision, emulate_bf16, interpreting, mma, narrow
from .reference import MASK_IDS, check_streams

HEAD_DIMS = (64, 128)


@triton.jit
def load_tile(src, batch, head, start, offs_rows, n_rows, stride_n, BLOCK: tl.constexpr,
              HEAD_DIM: tl.constexpr, TMA: tl.constexpr, BOUNDS: tl.constexpr):
    """Rows [start, start + BLOCK) of one head of a [B, N, H*D] tensor: a descriptor load, or a pointer load
    (masked when BOUNDS; zeros past ``n_rows``, in the tensor's own dtype: the 8-bit kernel loads int8 Q/K too)."""
    if TMA:
        return src.load([batch, start, head * HEAD_DIM]).reshape(BLOCK, HEAD_DIM)
    else:
        ptrs = src + offs_rows[:, None] * stride_n + tl.arange(0, HEAD_DIM)[None, :]
        if BOUNDS:
            return tl.load(ptrs, mask=(offs_rows < n_rows)[:, None], other=0)
        else:
            return tl.load(ptrs)


@triton.jit
def allowed_keys(q_idx, offs_n, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens,
                 MASK_MODE: tl.constexpr):
    """[BLOCK_M, BLOCK_N] the mask's verdict for queries ``q_idx`` and keys ``offs_n`` (``reference.attention_mask``
    without key lengths; shared with the 8-bit kernel, ``kernels.quantized_attention``)."""
    if MASK_MODE == 1:  # isolated: reference queries see reference keys only
        q_other = (q_idx < q_ref_lo) | (q_idx >= q_ctx_lo)
        k_ref = (offs_n >= k_ref_lo) & (offs_n < k_ctx_lo)
        allowed = q_other[:, None] | k_ref[None, :]
    else:  # prototype: a video query of frame f sees video keys, frame f's prototype, the context
        k_video = offs_n[None, :] < k_ref_lo
        k_context = offs_n[None, :] >= k_ctx_lo
        own_frame = ~k_video & ~k_context & ((offs_n[None, :] - k_ref_lo) // proto_tokens
                                             == (q_idx // tokens_per_frame)[:, None])
        q_video = q_idx[:, None] < q_ref_lo
        q_context = q_idx[:, None] >= q_ctx_lo
        allowed = tl.where(q_video, k_video | own_frame | k_context,
                           tl.where(q_context, k_video | k_context, ~k_video))
    return allowed


@triton.jit
def key_ranges(m_first, n_q, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens,
               MASK_MODE: tl.constexpr, BLOCK_M: tl.constexpr):
    """(a_lo, a_hi, b_lo, b_hi, c_lo, c_hi) of the query block starting at ``m_first`` (module docstring: A dense,
    B and C masked per element by ``allowed_keys``); shared with the 8-bit kernel."""
    m_last = tl.minimum(m_first + BLOCK_M, n_q) - 1
    a_lo = 0
    a_hi = n_k
    b_lo = 0
    b_hi = 0
    c_lo = 0
    c_hi = 0
    if MASK_MODE == 1:
        if (m_first >= q_ref_lo) & (m_last < q_ctx_lo):  # reference queries only
            a_lo = k_ref_lo
            a_hi = k_ctx_lo
        elif tl.maximum(m_first, q_ref_lo) <= tl.minimum(m_last, q_ctx_lo - 1):  # some reference queries
            a_lo = k_ref_lo
            a_hi = k_ctx_lo
            b_hi = k_ref_lo
            c_lo = k_ctx_lo
            c_hi = n_k
    elif MASK_MODE == 2:
        if m_last < q_ref_lo:  # video queries: video keys, their frames' prototypes, the context
            a_hi = k_ref_lo
            b_lo = k_ref_lo + (m_first // tokens_per_frame) * proto_tokens
            b_hi = tl.minimum(k_ctx_lo, k_ref_lo + (m_last // tokens_per_frame + 1) * proto_tokens)
            c_lo = k_ctx_lo
            c_hi = n_k
        elif (m_first >= q_ref_lo) & (m_last < q_ctx_lo):  # reference-range queries: every non-video key
            a_lo = k_ref_lo
        elif m_first >= q_ctx_lo:  # context queries: video and context keys
            a_hi = k_ref_lo
            c_lo = k_ctx_lo
            c_hi = n_k
        else:  # a mix: every key, masked per element
            a_hi = 0
            b_hi = n_k
    return a_lo, a_hi, b_lo, b_hi, c_lo, c_hi


@triton.jit
def _attn_range(acc, l_i, m_i, q, q_idx, k_src, v_src, batch, head, stride_kn, stride_vn,
                q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens, lo, hi,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BOUNDS: tl.constexpr, MASK_MODE: tl.constexpr,
                TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                EMULATE_BF16: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with the keys [lo, hi); logits are already in base 2."""
    for start in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = load_tile(k_src, batch, head, start, offs_n, hi, stride_kn, BLOCK_N, HEAD_DIM, TMA, BOUNDS)
        qk = mma(q, tl.trans(k), None, DOT_PRECISION, EMULATE_BF16)
        if MASK_MODE != 0:
            allowed = allowed_keys(q_idx, offs_n, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame,
                                   proto_tokens, MASK_MODE)
            qk = tl.where(allowed & (offs_n < hi)[None, :], qk, float("-inf"))
        elif BOUNDS:
            qk = tl.where((offs_n < hi)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASK_MODE != 0:  # a row may have seen no key yet: keep exp2 away from (-inf) - (-inf)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_src, batch, head, start, offs_n, hi, stride_vn, BLOCK_N, HEAD_DIM, TMA, BOUNDS)
        acc = mma(narrow(p, v.dtype, EMULATE_BF16), v, acc * alpha[:, None], DOT_PRECISION, EMULATE_BF16)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_body(q_src, k_src, v_src, o_src, KeyLen, batch, head, stride_qn, stride_kn, stride_vn, stride_on,
                    n_q, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens,
                    HEAD_DIM: tl.constexpr, MASK_MODE: tl.constexpr, HAS_KEY_LEN: tl.constexpr, TMA: tl.constexpr,
                    WARP_SPECIALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # 1. the query block, already rotated and scaled
    m_first = tl.program_id(0) * BLOCK_M
    q_idx = m_first + tl.arange(0, BLOCK_M)
    q = load_tile(q_src, batch, head, m_first, q_idx, n_q, stride_qn, BLOCK_M, HEAD_DIM, TMA, True)

    # 2. key ranges of this block (A: dense, B and C: masked per element), from indices only
    a_lo, a_hi, b_lo, b_hi, c_lo, c_hi = key_ranges(m_first, n_q, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo,
                                                    tokens_per_frame, proto_tokens, MASK_MODE, BLOCK_M)
    if HAS_KEY_LEN:  # this row's keys at or past its length (padding) are never read
        n_k_row = tl.minimum(n_k, tl.load(KeyLen + batch).to(tl.int32))
        a_hi = tl.minimum(a_hi, n_k_row)
        b_hi = tl.minimum(b_hi, n_k_row)
        c_hi = tl.minimum(c_hi, n_k_row)
    a_full = a_lo + tl.maximum(a_hi - a_lo, 0) // BLOCK_N * BLOCK_N

    # 3. online softmax over the ranges
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, q_idx, k_src, v_src, batch, head, stride_kn, stride_vn,
                                q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens, a_lo, a_full,
                                BLOCK_N, HEAD_DIM, False, 0, TMA, WARP_SPECIALIZE, DOT_PRECISION, EMULATE_BF16)
    acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, q_idx, k_src, v_src, batch, head, stride_kn, stride_vn,
                                q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens, a_full, a_hi,
                                BLOCK_N, HEAD_DIM, True, 0, TMA, False, DOT_PRECISION, EMULATE_BF16)
    if MASK_MODE != 0:
        acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, q_idx, k_src, v_src, batch, head, stride_kn, stride_vn,
                                    q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens, b_lo,
                                    b_hi, BLOCK_N, HEAD_DIM, True, MASK_MODE, TMA, False, DOT_PRECISION, EMULATE_BF16)
    if MASK_MODE == 1:
        acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, q_idx, k_src, v_src, batch, head, stride_kn, stride_vn,
                                    q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens, c_lo,
                                    c_hi, BLOCK_N, HEAD_DIM, True, MASK_MODE, TMA, False, DOT_PRECISION, EMULATE_BF16)
    elif MASK_MODE == 2:  # the context: every key of it allowed to the blocks that get a range C (key_ranges)
        acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, q_idx, k_src, v_src, batch, head, stride_kn, stride_vn,
                                    q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens, c_lo,
                                    c_hi, BLOCK_N, HEAD_DIM, True, 0, TMA, False, DOT_PRECISION, EMULATE_BF16)

    # 4. normalise and store (fully masked rows give 0)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out_ty = o_src.dtype if TMA else o_src.dtype.element_ty
    out = narrow(acc / l_safe[:, None], out_ty, EMULATE_BF16).to(out_ty)
    if TMA:
        o_src.store([batch, m_first, head * HEAD_DIM], out.reshape(1, BLOCK_M, HEAD_DIM))
    else:
        tl.store(o_src + q_idx[:, None] * stride_on + tl.arange(0, HEAD_DIM)[None, :], out,
                 mask=(q_idx < n_q)[:, None])


@triton.jit
def _attention_fwd_tma(desc_q, desc_k, desc_v, desc_o, KeyLen, n_heads, n_q, n_k, q_ref_lo, q_ctx_lo, k_ref_lo,
                       k_ctx_lo, tokens_per_frame, proto_tokens, q_bucket, k_bucket,
                       HEAD_DIM: tl.constexpr, MASK_MODE: tl.constexpr, HAS_KEY_LEN: tl.constexpr,
                       WARP_SPECIALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # q_bucket / k_bucket: the autotuner's keys (token counts rounded up to a power of two), unread here;
    # KeyLen: [B] int32 key lengths, read only when HAS_KEY_LEN (None otherwise)
    batch = tl.program_id(1) // n_heads
    head = tl.program_id(1) % n_heads
    _attention_body(desc_q, desc_k, desc_v, desc_o, KeyLen, batch, head, 0, 0, 0, 0, n_q, n_k, q_ref_lo, q_ctx_lo,
                    k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens, HEAD_DIM, MASK_MODE, HAS_KEY_LEN, True,
                    WARP_SPECIALIZE, DOT_PRECISION, EMULATE_BF16, BLOCK_M, BLOCK_N)


@triton.jit
def _attention_fwd(Q, K, V, Out, KeyLen, stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh, stride_ob, stride_on, stride_oh,
                   n_heads, n_q, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens,
                   HEAD_DIM: tl.constexpr, MASK_MODE: tl.constexpr, HAS_KEY_LEN: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    batch = (tl.program_id(1) // n_heads).to(tl.int64)
    head = tl.program_id(1) % n_heads
    _attention_body(Q + batch * stride_qb + head * stride_qh, K + batch * stride_kb + head * stride_kh,
                    V + batch * stride_vb + head * stride_vh, Out + batch * stride_ob + head * stride_oh, KeyLen,
                    batch, head, stride_qn, stride_kn, stride_vn, stride_on, n_q, n_k, q_ref_lo, q_ctx_lo,
                    k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens, HEAD_DIM, MASK_MODE, HAS_KEY_LEN, False,
                    False, DOT_PRECISION, EMULATE_BF16, BLOCK_M, BLOCK_N)


# --- autotuning ------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize): 128x128 / 8 warps / 3 stages is the Hopper
# recipe of Triton's fused-attention tutorial and tritonbench; every entry is compiled for sm_90 and sm_80,
# as launched, by ``kernels.compile_check`` (its table is the basis of the pruning below).
AUTOTUNE_CONFIGS = [
    (128, 128, 8, 3, False),
    (128, 128, 8, 3, True),
    (128, 64, 8, 3, False),
    (128, 64, 4, 3, False),
    (64, 64, 4, 3, False),
    (64, 32, 4, 4, False),
    (32, 32, 4, 2, False),
]
# the pointer entry (TensorRT plugin, AOT library): (BLOCK_M, BLOCK_N, num_warps, num_stages) per (SM major,
# head dim), the largest tiles without spills as specialised (compile_check, tests/export/test_trt_kernel.py):
# at head_dim 128, sm_80's mma.sync path spills 32 B at 128x64 and none at 128x32
POINTER_CONFIGS = {(9, 64): (128, 64, 8, 3), (9, 128): (128, 64, 8, 3),
                   (8, 64): (128, 64, 8, 3), (8, 128): (128, 32, 8, 3)}
POINTER_CONFIG_FP32 = (32, 32, 4, 2)
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, WARP_SPECIALIZE=False)


def config_fits(block_m: int, block_n: int, warp_specialize: bool, *, head_dim: int, ieee: bool, n_q: int,
                major: int, mask: str = "full", warps: int = 8) -> bool:
    """Whether a config suits the problem: fp32 (IEEE products on CUDA cores) needs tiles of at most 32x32;
    16-bit tiles wider than the head dim or far taller than the query count waste work; the prototype
    mask's index arithmetic spills at 128x128, and at 128x64 on 4 warps (compile_check: 255 registers); warp specialisation
    needs Hopper or newer."""
    if ieee:
        return block_m * block_n <= 32 * 32 and not warp_specialize
    if mask == "prototype" and (block_m * block_n > 128 * 64 or (block_m * block_n > 64 * 64 and warps < 8)):
        return False
    return (block_m * block_n > 32 * 32 and block_n <= head_dim and block_m <= max(64, triton.next_power_of_2(n_q))
            and (major >= 9 or not warp_specialize))


def _prune_configs(configs, named_args, **kwargs):
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 9
    mask = {v: k for k, v in MASK_IDS.items()}[kwargs["MASK_MODE"]]
    kept = [c for c in configs if config_fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["WARP_SPECIALIZE"],
                                              head_dim=kwargs["HEAD_DIM"], ieee=kwargs["DOT_PRECISION"] == "ieee",
                                              n_q=named_args["q_bucket"], major=major, mask=mask, warps=c.num_warps)]
    return kept or configs[-1:]


def _block_shapes(nargs):
    """Descriptors are built before the config is chosen: give them the config's tile shapes."""
    d = nargs["HEAD_DIM"]
    for name, rows in (("desc_q", "BLOCK_M"), ("desc_o", "BLOCK_M"), ("desc_k", "BLOCK_N"), ("desc_v", "BLOCK_N")):
        nargs[name].block_shape = [1, nargs[rows], d]


_attention_tuned = triton.autotune(
    configs=[triton.Config(dict(BLOCK_M=m, BLOCK_N=n, WARP_SPECIALIZE=ws), num_warps=w, num_stages=s,
                           pre_hook=_block_shapes) for m, n, w, s, ws in AUTOTUNE_CONFIGS],
    # bucketed token counts: a new resolution re-tunes only when it crosses a power of two
    key=["q_bucket", "k_bucket", "HEAD_DIM", "MASK_MODE", "HAS_KEY_LEN", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_attention_fwd_tma)


# --- launcher ---------------------------------------------------------------------------------------------
def check_inputs(q, k, v, out, q_offsets, k_offsets, key_lengths, mask, tokens_per_frame, proto_tokens,
                 what: str = "joint attention"):
    """One-line ValueErrors for a launch's operands and streams (shared with the 8-bit kernel)."""
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
    check_streams(n_q, k.shape[1], q_offsets, k_offsets, mask, key_lengths, batch)
    if key_lengths is not None and key_lengths.device != q.device:
        raise ValueError(f"key_lengths is on {key_lengths.device} but q is on {q.device}")
    if tokens_per_frame < 1 or proto_tokens < 1:
        raise ValueError(f"tokens_per_frame and proto_tokens must be >= 1, got {tokens_per_frame}, {proto_tokens}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device} with "
                         f"stride(-1) == 1, got {out.dtype} {tuple(out.shape)} on {out.device}")
    check_device(q, what)


def _descriptor(t: torch.Tensor, rows: int):
    """A [B, N, H*D] tensor descriptor of a [B, N, H, D] tensor (copied first if its heads are not packed:
    TMA needs unit stride in the channels and 16-byte aligned strides)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not (t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] and t.stride(1) == t.shape[2] * t.shape[3]):
        t = t.contiguous()
    return TensorDescriptor.from_tensor(t.flatten(2), [1, rows, t.shape[-1]])


def _key_len(key_lengths: torch.Tensor | None):
    """The kernel's KeyLen operand: int32 lengths, or None (unread: HAS_KEY_LEN is False)."""
    return None if key_lengths is None else key_lengths.to(torch.int32).contiguous()


def launch_args(q, k, v, out, *, q_offsets, k_offsets, key_lengths=None, mask="full", tokens_per_frame=1,
                proto_tokens=1, block_m=128, block_n=128):
    """The positional arguments and compile-time metadata of ``_attention_fwd_tma`` for one call (shared by the
    launcher and by ``kernels.compile_check``, which compiles exactly what a launch specialises); descriptors
    start at (block_m, block_n) tiles, the autotuner's pre-hook resizes them per config."""
    _, n_q, heads, _ = q.shape
    n_k = k.shape[1]
    args = (_descriptor(q, block_m), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(out, block_m),
            _key_len(key_lengths), heads, n_q, n_k, *q_offsets, *k_offsets, tokens_per_frame, proto_tokens,
            triton.next_power_of_2(max(n_q, 1)), triton.next_power_of_2(max(n_k, 1)))
    return args, _meta(q, mask, key_lengths is not None)


def _meta(q: torch.Tensor, mask: str, has_key_len: bool = False) -> dict:
    """The compile-time arguments both entries share."""
    return dict(HEAD_DIM=q.shape[-1], MASK_MODE=MASK_IDS[mask], HAS_KEY_LEN=has_key_len,
                DOT_PRECISION=dot_precision(q.dtype), EMULATE_BF16=emulate_bf16(q.dtype))


def attention_triton(q, k, v, *, q_offsets, k_offsets, key_lengths=None, mask="full", tokens_per_frame=1,
                     proto_tokens=1, out=None, config=None):
    """Launch the kernel on pre-rotated, pre-scaled Q/K (``rotated_attention_reference``'s arguments), writing
    ``out`` if given; ``config`` (dict(BLOCK_M=, BLOCK_N=, num_warps=, num_stages=, WARP_SPECIALIZE=))
    bypasses autotuning (the interpreter takes small tiles)."""
    check_inputs(q, k, v, out, q_offsets, k_offsets, key_lengths, mask, tokens_per_frame, proto_tokens)
    q_offsets, k_offsets = tuple(int(o) for o in q_offsets), tuple(int(o) for o in k_offsets)
    batch, n_q, heads, _ = q.shape
    n_k = k.shape[1]
    result = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None or not out.is_contiguous() else out
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    if not (n_q and n_k):
        result.zero_()
    elif q.is_cuda and config is None and torch.cuda.get_device_capability(q.device)[0] < 9:
        # before Hopper the descriptor entry lowers to plain loads that spill (compile_check): the pointer entry,
        # which takes any strides
        bm, bn, warps, stages = POINTER_CONFIG_FP32 if q.dtype == torch.float32 else POINTER_CONFIGS[(8, q.shape[-1])]
        _attention_fwd[(triton.cdiv(n_q, bm), batch * heads)](
            q, k, v, result, _key_len(key_lengths), *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *result.stride()[:3], heads, n_q, n_k, *q_offsets, *k_offsets, tokens_per_frame, proto_tokens,
            **_meta(q, mask, key_lengths is not None), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    else:  # descriptors (copying tensors whose heads are not packed)
        tiles = dict(block_m=128, block_n=128) if config is None else dict(block_m=config["BLOCK_M"],
                                                                              block_n=config["BLOCK_N"])
        args, meta = launch_args(q, k, v, result, q_offsets=q_offsets, k_offsets=k_offsets, key_lengths=key_lengths,
                                 mask=mask, tokens_per_frame=tokens_per_frame, proto_tokens=proto_tokens, **tiles)
        if config is None:
            _attention_tuned[lambda m: (triton.cdiv(n_q, m["BLOCK_M"]), batch * heads)](*args, **meta)
        else:
            _attention_fwd_tma[(triton.cdiv(n_q, tiles["block_m"]), batch * heads)](*args, **meta, **config)
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result
