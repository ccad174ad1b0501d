"""Triton kernel of the 8-bit joint attention: INT8 QK^T (int32 accumulation, per-block scales, K smoothed) and
P.V in FP8 e4m3 with fp32 accumulation (sm_89 and newer) or in V's 16-bit dtype (sm_80); semantics of
``reference.quantized_attention_reference``, masks, streams and key lengths of ``kernels.joint_attention``.

The loop is the 16-bit kernel's (``kernels.joint_attention.kernel``) with these changes:
  - the logits are an integer MMA of int8 Q and K tiles, converted to fp32 once (one I2F per logit: the only
    per-logit instruction the 16-bit loop does not have); the block scales (one per query tile, one per K block
    of ``K_BLOCK`` keys, a key tile holding one or more) go into the same fused multiply-add that subtracts the
    running maximum, which is taken on the unscaled logits per K block (the scales are positive);
  - P in FP8 (``PV_FP8``): ``2**(s - m) * 448``, the 448 folded into the subtracted maximum (P uses e4m3's whole
    range at no cost; the row sum carries the same factor and cancels it), times the tile of V^T in e4m3
    (per-channel scales, applied once at the end; its keys stored in the order in which P's accumulator
    registers already form the FP8 MMA's operand, ``_mma_key_order``); each tile's MMA starts from zero and its
    result is added to the fp32 accumulator (SageAttention 2's two-level accumulation: the FP8 MMA's own
    accumulator is narrower than fp32, so it never sums more than one key tile, 256 keys on sm_90);
  - the key ranges of a query block are cut at tile boundaries: a masked head (keys below the first multiple of
    BLOCK_N), the dense middle, a masked tail; so every tile starts at a multiple of BLOCK_N, and of K_BLOCK.
Under the interpreter, ``EMULATE_FP8`` rounds P on e4m3's grid in fp32 (see ``quantize._round_e4m3``) and the
products run in fp32 (the MMA of e4m3 values is exact; only the accumulation order differs from the GPU's).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import emulate_bf16, interpreting, mma, narrow
from ..joint_attention.kernel import allowed_keys, check_inputs, key_ranges, load_tile
from ..joint_attention.reference import MASK_IDS
from .quantize import _round_e4m3, quantize_qk_triton, quantize_v_triton
from .reference import DEFAULT_BLOCKS, QuantizedQK, check_pv, default_pv

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
_LOG2_FP8_MAX = tl.constexpr(8.807354922057604)  # log2(448): P is 2**(s - (m - log2 448)) = 448 * 2**(s - m)


@triton.jit
def _load_vt(src, batch, head, start, offs, stride_vd, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
             TMA: tl.constexpr):
    """Columns [start, start + BLOCK_N) of one head's e4m3 V^T [D, N_pad] (N_pad a multiple of BLOCK_N: every tile
    is in bounds; the padding is zeros and masked keys have P = 0)."""
    if TMA:
        return src.load([batch, head * HEAD_DIM, start]).reshape(HEAD_DIM, BLOCK_N)
    else:
        return tl.load(src + tl.arange(0, HEAD_DIM)[:, None] * stride_vd + offs[None, :])


@triton.jit
def _mma_key_order(p, BLOCK_N: tl.constexpr):
    """P's columns reordered so that the logits' MMA accumulator layout is the FP8 MMA's A-operand layout as it
    stands (no shuffles). The accumulator gives a thread the column pairs {2t, 2t+1} and {2t+8, 2t+9} of every
    16 (t: the lane's position in its quad), the e4m3 operand wants 4 consecutive keys {4t, .., 4t+3} per register:
    so column ``k`` of the result is column ``c`` of ``p`` with c = k0 + 2 k2 + 4 k3 + 8 k1 (k's bits, per 16
    columns). The sum over keys of P.V is unchanged when V^T's columns follow the same order, which is how
    ``quantize._quantize_v_fp8`` stores them (``quantize.mma_key_position``)."""
    p = p.reshape(p.shape[0], BLOCK_N // 16, 2, 2, 2, 2)  # c3 c2 c1 c0
    return tl.permute(p, (0, 1, 3, 4, 2, 5)).reshape(p.shape[0], BLOCK_N)  # k3 k2 k1 k0 = c2 c1 c3 c0


@triton.jit
def _exp2_scaled(qk, scale, sub, BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr):
    """exp2(qk * scale - sub[:, None]) in one fused multiply-add per logit: ``scale`` a scalar (the tile is one K
    block) or one per K block of the tile, broadcast over the block's columns in a [rows, blocks, K_BLOCK] view."""
    if K_BLOCK == BLOCK_N:
        return tl.math.exp2(qk * scale - sub[:, None])
    else:
        qk = qk.reshape(qk.shape[0], BLOCK_N // K_BLOCK, K_BLOCK)
        return tl.math.exp2(qk * scale[None, :, None] - sub[:, None, None]).reshape(qk.shape[0], BLOCK_N)


@triton.jit
def _attn_range(acc, l_i, m_i, q, q_scale, q_idx, k_src, k_scale, v_src, batch, head, stride_kn, stride_vn,
                n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens, lo, hi,
                BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BOUNDS: tl.constexpr,
                MASK_MODE: tl.constexpr, TMA: tl.constexpr, PV_FP8: tl.constexpr, EMULATE_FP8: tl.constexpr,
                EMULATE_BF16: tl.constexpr):
    """Online-softmax update with the keys [lo, hi), tiles from lo // BLOCK_N * BLOCK_N (``BOUNDS``: keys outside
    [lo, hi) masked; else lo and hi are multiples of BLOCK_N), each tile BLOCK_N // K_BLOCK blocks of K's
    quantisation (``k_scale``: their scales, one per K_BLOCK keys)."""
    first = lo // BLOCK_N * BLOCK_N
    for start in tl.range(first, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = load_tile(k_src, batch, head, start, offs_n, n_k, stride_kn, BLOCK_N, HEAD_DIM, TMA, BOUNDS)
        qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        if BOUNDS:
            inside = ((offs_n >= lo) & (offs_n < hi))[None, :]
            if MASK_MODE != 0:  # the 16-bit kernel's verdict (kernels.joint_attention.kernel.allowed_keys)
                inside = inside & allowed_keys(q_idx, offs_n, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo,
                                               tokens_per_frame, proto_tokens, MASK_MODE)
            qk = tl.where(inside, qk, float("-inf"))
        # the scales are > 0 (quantize's floor): the maximum of the scaled logits is the scaled maximum, -inf stays
        if K_BLOCK == BLOCK_N:
            scale = q_scale * tl.load(k_scale + start // BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
        else:  # one scale per K block of the tile; blocks past the keys (all masked) read 1
            blocks = start // K_BLOCK + tl.arange(0, BLOCK_N // K_BLOCK)
            scale = q_scale * tl.load(k_scale + blocks, mask=blocks < tl.cdiv(n_k, K_BLOCK), other=1.0)
            block_max = tl.max(qk.reshape(qk.shape[0], BLOCK_N // K_BLOCK, K_BLOCK), 2)
            m_new = tl.maximum(m_i, tl.max(block_max * scale[None, :], 1))
        if BOUNDS:  # a row may have seen no key yet: keep exp2 away from (-inf) - (-inf)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new)
        if PV_FP8:
            p = _exp2_scaled(qk, scale, m_new - _LOG2_FP8_MAX, BLOCK_N, K_BLOCK)  # 448 * 2**(s - m)
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = _load_vt(v_src, batch, head, start, offs_n, stride_vn, HEAD_DIM, BLOCK_N, TMA)
            p8 = _mma_key_order(_round_e4m3(p, EMULATE_FP8), BLOCK_N)  # V^T's keys are stored in this order
            if EMULATE_FP8:
                pv = tl.dot(p8.to(tl.float32), tl.trans(vt).to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p8, tl.trans(vt))
            acc = acc * alpha[:, None] + pv
        else:
            p = _exp2_scaled(qk, scale, m_new, BLOCK_N, K_BLOCK)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = load_tile(v_src, batch, head, start, offs_n, n_k, stride_vn, BLOCK_N, HEAD_DIM, TMA, BOUNDS)
            acc = mma(narrow(p, v.dtype, EMULATE_BF16), v, acc * alpha[:, None], "tf32", EMULATE_BF16)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_body(q_src, k_src, v_src, o_src, QScale, KScale, VScale, KeyLen, batch, head, n_heads, stride_qn,
                    stride_kn, stride_vn, stride_on, n_q, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo,
                    tokens_per_frame, proto_tokens, HEAD_DIM: tl.constexpr, MASK_MODE: tl.constexpr,
                    HAS_KEY_LEN: tl.constexpr, TMA: tl.constexpr, PV_FP8: tl.constexpr, EMULATE_FP8: tl.constexpr,
                    EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    K_BLOCK: tl.constexpr):
    # 1. the int8 query block and its scale
    bh = batch * n_heads + head
    m_first = tl.program_id(0) * BLOCK_M
    q_idx = m_first + tl.arange(0, BLOCK_M)
    q = load_tile(q_src, batch, head, m_first, q_idx, n_q, stride_qn, BLOCK_M, HEAD_DIM, TMA, True)
    q_scale = tl.load(QScale + bh * tl.cdiv(n_q, BLOCK_M) + tl.program_id(0))
    k_scale = KScale + bh * tl.cdiv(n_k, K_BLOCK)

    # 2. key ranges, range A cut at tile boundaries: [a_lo, a_mid) masked, [a_mid, a_tail) dense, [a_tail, a_hi)
    a_lo, a_hi, b_lo, b_hi, c_lo, c_hi = key_ranges(m_first, n_q, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo,
                                                    tokens_per_frame, proto_tokens, MASK_MODE, BLOCK_M)
    if HAS_KEY_LEN:  # this row's keys at or past its length (padding) are never read
        n_k_row = tl.minimum(n_k, tl.load(KeyLen + batch).to(tl.int32))
        a_hi = tl.minimum(a_hi, n_k_row)
        b_hi = tl.minimum(b_hi, n_k_row)
        c_hi = tl.minimum(c_hi, n_k_row)
    a_mid = tl.cdiv(a_lo, BLOCK_N) * BLOCK_N
    a_tail = tl.maximum(a_hi // BLOCK_N * BLOCK_N, a_mid)

    # 3. online softmax over the ranges (m_i: the running maximum of the scaled logits)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, q_scale, q_idx, k_src, k_scale, v_src, batch, head, stride_kn,
                                stride_vn, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame,
                                proto_tokens, a_mid, a_tail, BLOCK_N, K_BLOCK, HEAD_DIM, False, 0, TMA, PV_FP8,
                                EMULATE_FP8, EMULATE_BF16)
    acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, q_scale, q_idx, k_src, k_scale, v_src, batch, head, stride_kn,
                                stride_vn, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame,
                                proto_tokens, a_lo, tl.minimum(a_mid, a_hi), BLOCK_N, K_BLOCK, HEAD_DIM, True, 0,
                                TMA, PV_FP8, EMULATE_FP8, EMULATE_BF16)
    acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, q_scale, q_idx, k_src, k_scale, v_src, batch, head, stride_kn,
                                stride_vn, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame,
                                proto_tokens, a_tail, a_hi, BLOCK_N, K_BLOCK, HEAD_DIM, True, 0, TMA, PV_FP8,
                                EMULATE_FP8, EMULATE_BF16)
    if MASK_MODE != 0:
        acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, q_scale, q_idx, k_src, k_scale, v_src, batch, head, stride_kn,
                                    stride_vn, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame,
                                    proto_tokens, b_lo, b_hi, BLOCK_N, K_BLOCK, HEAD_DIM, True, MASK_MODE, TMA,
                                    PV_FP8, EMULATE_FP8, EMULATE_BF16)
    if MASK_MODE == 1:
        acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, q_scale, q_idx, k_src, k_scale, v_src, batch, head, stride_kn,
                                    stride_vn, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame,
                                    proto_tokens, c_lo, c_hi, BLOCK_N, K_BLOCK, HEAD_DIM, True, MASK_MODE, TMA,
                                    PV_FP8, EMULATE_FP8, EMULATE_BF16)
    elif MASK_MODE == 2:  # the context: every key of it allowed to the blocks that get a range C
        acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, q_scale, q_idx, k_src, k_scale, v_src, batch, head, stride_kn,
                                    stride_vn, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame,
                                    proto_tokens, c_lo, c_hi, BLOCK_N, K_BLOCK, HEAD_DIM, True, 0, TMA, PV_FP8,
                                    EMULATE_FP8, EMULATE_BF16)

    # 4. normalise (and undo V's per-channel scales), store; fully masked rows give 0
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if PV_FP8:
        out = out * tl.load(VScale + bh * HEAD_DIM + tl.arange(0, HEAD_DIM))[None, :]
    out_ty = o_src.dtype if TMA else o_src.dtype.element_ty
    out = narrow(out, out_ty, EMULATE_BF16).to(out_ty)
    if TMA:
        o_src.store([batch, m_first, head * HEAD_DIM], out.reshape(1, BLOCK_M, HEAD_DIM))
    else:
        tl.store(o_src + q_idx[:, None] * stride_on + tl.arange(0, HEAD_DIM)[None, :], out,
                 mask=(q_idx < n_q)[:, None])


@triton.jit
def _quantized_fwd_tma(desc_q, desc_k, desc_v, desc_o, QScale, KScale, VScale, KeyLen, n_heads, n_q, n_k,
                       q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens,
                       HEAD_DIM: tl.constexpr, MASK_MODE: tl.constexpr, HAS_KEY_LEN: tl.constexpr,
                       PV_FP8: tl.constexpr, EMULATE_FP8: tl.constexpr, EMULATE_BF16: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr):
    """Descriptors (TMA on sm_90): Q/K int8 [B, N, H*D], V e4m3 V^T [B, H*D, N_pad] (or 16-bit [B, N, H*D]),
    Out [B, N, H*D]; KeyLen read only when HAS_KEY_LEN."""
    batch = tl.program_id(1) // n_heads
    head = tl.program_id(1) % n_heads
    _attention_body(desc_q, desc_k, desc_v, desc_o, QScale, KScale, VScale, KeyLen, batch, head, n_heads, 0, 0, 0,
                    0, n_q, n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens, HEAD_DIM,
                    MASK_MODE, HAS_KEY_LEN, True, PV_FP8, EMULATE_FP8, EMULATE_BF16, BLOCK_M, BLOCK_N, K_BLOCK)


@triton.jit
def _quantized_fwd(Q, K, V, Out, QScale, KScale, VScale, KeyLen, stride_qb, stride_qn, stride_kb, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_ob, stride_on, n_heads, n_q, n_k, q_ref_lo, q_ctx_lo,
                   k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens, HEAD_DIM: tl.constexpr,
                   MASK_MODE: tl.constexpr, HAS_KEY_LEN: tl.constexpr, PV_FP8: tl.constexpr,
                   EMULATE_FP8: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, K_BLOCK: tl.constexpr):
    """Pointers (before Hopper): Q/K int8 and Out [B, N, H, D] with packed heads; V^T e4m3 [B, H, D, N_pad]
    (``stride_vn`` its channel stride) or 16-bit V [B, N, H, D] (``stride_vn`` its token stride)."""
    batch = (tl.program_id(1) // n_heads).to(tl.int64)
    head = tl.program_id(1) % n_heads
    _attention_body(Q + batch * stride_qb + head * HEAD_DIM, K + batch * stride_kb + head * HEAD_DIM,
                    V + batch * stride_vb + head * stride_vh, Out + batch * stride_ob + head * HEAD_DIM, QScale,
                    KScale, VScale, KeyLen, batch, head, n_heads, stride_qn, stride_kn, stride_vn, stride_on, n_q,
                    n_k, q_ref_lo, q_ctx_lo, k_ref_lo, k_ctx_lo, tokens_per_frame, proto_tokens, HEAD_DIM,
                    MASK_MODE, HAS_KEY_LEN, False, PV_FP8, EMULATE_FP8, EMULATE_BF16, BLOCK_M, BLOCK_N, K_BLOCK)


# --- configs ------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (SM major, head dim). The query tile is Q's quantisation block; K's
# block is the key tile up to DEFAULT_BLOCKS[1] keys (``key_block``), so a 256-key tile holds two K blocks and the
# numbers do not depend on the tile. Fixed per GPU rather than autotuned; every entry is compiled, as launched, by
# ``kernels.compile_check``: sm_90 d128 full at 128x256 has 0 spills and the fewest SASS per 64 keys (the per-tile
# work, the accumulator's rescaling included, spread over twice the keys); its prototype mask spills there
# (its index arithmetic) and its 16-bit P.V does not fit shared memory at 3 stages: those take 128-key tiles
# (``NARROW_BLOCK_N``). sm_89 spills at 128x128 (d128: 60 B); at d64 its 128x64 tile on 8 warps no longer spills
# since P needs no permutation (137 registers, 316 SASS per 64 keys against 327 at 64x64), kept at 64x64 here: the
# wider tile would coarsen Q's blocks on sm_80 and sm_89, a change for a GPU's timings to decide.
GPU_CONFIGS = {(9, 64): (128, 256, 8, 3), (9, 128): (128, 256, 8, 3),
               (8, 64): (64, 64, 4, 2), (8, 128): (128, 64, 8, 2)}
NARROW_BLOCK_N = DEFAULT_BLOCKS[1]
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)


def key_block(block_n: int) -> int:
    """K's quantisation block for a key tile of ``block_n``: the tile, at most DEFAULT_BLOCKS[1] keys."""
    return min(block_n, DEFAULT_BLOCKS[1])


def tile_config(major: int, head_dim: int, mask: str = "full", pv: str = "fp8") -> dict:
    """The launch config for an SM major (8 for sm_80/sm_89, 9 for sm_90 and newer), head dim, mask and P.V."""
    bm, bn, warps, stages = GPU_CONFIGS[(min(max(major, 8), 9), head_dim)]
    if mask == "prototype" or pv != "fp8":
        bn = min(bn, NARROW_BLOCK_N)
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def gpu_config(device: torch.device, head_dim: int, mask: str = "full", pv: str = "fp8") -> dict:
    return tile_config(torch.cuda.get_device_capability(device)[0], head_dim, mask, pv)


def _check_inputs(q, k, v, out, q_offsets, k_offsets, key_lengths, mask, tokens_per_frame, proto_tokens, pv):
    """The 16-bit kernel's checks, then what the 8-bit one adds: 16-bit operands, and FP8 P.V where it runs."""
    check_pv(pv)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} must be float16/bfloat16 for the 8-bit attention kernel, got {t.dtype}")
    check_inputs(q, k, v, out, q_offsets, k_offsets, key_lengths, mask, tokens_per_frame, proto_tokens,
                 "8-bit attention")
    if pv == "fp8" and q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        raise ValueError(f"pv='fp8' needs FP8 tensor cores (sm_89 or newer), this GPU is sm_"
                         f"{''.join(map(str, torch.cuda.get_device_capability(q.device)))}: use pv='16bit'")


def _packed(t: torch.Tensor) -> torch.Tensor:
    """t with packed heads ([B, N, H, D] contiguous from dim 1 on), copied only if needed."""
    if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] and t.stride(1) == t.shape[2] * t.shape[3]:
        return t
    return t.contiguous()


def _descriptor(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def _tiles(quantized: QuantizedQK, block_n: int | None) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): the query tile is Q's block; the key tile ``block_n`` (default K's block) a multiple of
    K's block."""
    bn = quantized.block_k if block_n is None else block_n
    if bn % quantized.block_k:
        raise ValueError(f"the key tile ({bn}) must be a multiple of K's quantisation block ({quantized.block_k})")
    return quantized.block_q, bn


def launch_args(quantized: QuantizedQK, v_operand, v_scale, out, *, q_offsets, k_offsets, key_lengths=None,
                mask="full", tokens_per_frame=1, proto_tokens=1, pv="fp8", block_n=None):
    """The positional arguments and compile-time metadata of ``_quantized_fwd_tma`` for quantised operands
    (``v_operand``: e4m3 V^T [B, H, D, N_pad] for ``pv="fp8"``, N_pad a multiple of the key tile, else 16-bit V
    [B, N, H, D] with packed heads); shared by the launcher and ``kernels.compile_check`` (``_tiles``)."""
    q8, k8 = quantized.q, quantized.k
    batch, n_q, heads, head_dim = q8.shape
    bm, bn = _tiles(quantized, block_n)
    if pv == "fp8":
        desc_v = _descriptor(v_operand.flatten(1, 2), [1, head_dim, bn])
    else:
        desc_v = _descriptor(v_operand.flatten(2), [1, bn, head_dim])
    args = (_descriptor(q8.flatten(2), [1, bm, head_dim]), _descriptor(k8.flatten(2), [1, bn, head_dim]), desc_v,
            _descriptor(out.flatten(2), [1, bm, head_dim]), quantized.q_scale, quantized.k_scale, v_scale,
            None if key_lengths is None else key_lengths.to(torch.int32).contiguous(), heads, n_q, k8.shape[1],
            *q_offsets, *k_offsets, tokens_per_frame, proto_tokens)
    return args, _meta(head_dim, mask, key_lengths is not None, pv, out.dtype) | dict(BLOCK_M=bm, BLOCK_N=bn,
                                                                                       K_BLOCK=quantized.block_k)


def _meta(head_dim, mask, has_key_len, pv, dtype) -> dict:
    return dict(HEAD_DIM=head_dim, MASK_MODE=MASK_IDS[mask], HAS_KEY_LEN=has_key_len, PV_FP8=pv == "fp8",
                EMULATE_FP8=interpreting() and pv == "fp8", EMULATE_BF16=emulate_bf16(dtype))


def quantized_attention_triton(q, k, v, *, q_offsets, k_offsets, key_lengths=None, mask="full", tokens_per_frame=1,
                               proto_tokens=1, pv=None, smooth=True, out=None, config=None):
    """Quantise the prologue's 16-bit q [B, Nq, H, D], k/v [B, Nk, H, D] (``quantize``) and run the kernel,
    writing ``out`` if given; ``pv`` None: ``default_pv``; ``config`` (dict(BLOCK_M=, BLOCK_N=, num_warps=,
    num_stages=), optionally K_BLOCK=, K's quantisation block, default ``key_block(BLOCK_N)``) overrides the GPU's
    (the interpreter takes small tiles). Rows with no allowed key give 0."""
    pv = default_pv(q.device) if pv is None else pv
    _check_inputs(q, k, v, out, q_offsets, k_offsets, key_lengths, mask, tokens_per_frame, proto_tokens, pv)
    q_offsets, k_offsets = tuple(int(o) for o in q_offsets), tuple(int(o) for o in k_offsets)
    if config is None:
        config = INTERPRETER_CONFIG if interpreting() else gpu_config(q.device, q.shape[-1], mask, pv)
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    result = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None or not out.is_contiguous() else out
    if not (n_q and n_k):
        result.zero_()
    else:
        q, k, v = _packed(q), _packed(k), _packed(v)
        block_k = config.get("K_BLOCK", key_block(config["BLOCK_N"]))
        quantized = quantize_qk_triton(q, k, block_q=config["BLOCK_M"], block_k=block_k, smooth=smooth)
        if pv == "fp8":
            v_operand, v_scale = quantize_v_triton(v, emulate=interpreting(), block=quantized.block_k,
                                                   tile=config["BLOCK_N"])
        else:
            v_operand, v_scale = v, quantized.k_scale  # the scale operand is unread without FP8
        grid = (triton.cdiv(n_q, config["BLOCK_M"]), batch * heads)
        kw = dict(q_offsets=q_offsets, k_offsets=k_offsets, key_lengths=key_lengths, mask=mask,
                  tokens_per_frame=tokens_per_frame, proto_tokens=proto_tokens, pv=pv, block_n=config["BLOCK_N"])
        launch = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
        if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9:
            args, meta = pointer_args(quantized, v_operand, v_scale, result, **kw)
            _quantized_fwd[grid](*args, **meta, **launch)
        else:
            args, meta = launch_args(quantized, v_operand, v_scale, result, **kw)
            _quantized_fwd_tma[grid](*args, **meta, **launch)
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result


def pointer_args(quantized: QuantizedQK, v_operand, v_scale, out, *, q_offsets, k_offsets, key_lengths=None,
                 mask="full", tokens_per_frame=1, proto_tokens=1, pv="fp8", block_n=None):
    """``launch_args`` for the pointer entry ``_quantized_fwd`` (before Hopper the descriptor entry lowers to plain
    loads anyway); shared by the launcher and ``kernels.compile_check``."""
    q8, k8 = quantized.q, quantized.k
    if pv == "fp8":  # V^T [B, H, D, N_pad]: batch, head and channel strides
        v_strides = (v_operand.stride(0), v_operand.stride(1), v_operand.stride(2))
    else:  # V [B, N, H, D]: batch stride, head stride D, token stride
        v_strides = (v_operand.stride(0), v_operand.stride(2), v_operand.stride(1))
    args = (q8, k8, v_operand, out, quantized.q_scale, quantized.k_scale, v_scale,
            None if key_lengths is None else key_lengths.to(torch.int32).contiguous(), q8.stride(0), q8.stride(1),
            k8.stride(0), k8.stride(1), *v_strides, out.stride(0), out.stride(1), q8.shape[2], q8.shape[1],
            k8.shape[1], *q_offsets, *k_offsets, tokens_per_frame, proto_tokens)
    meta = _meta(q8.shape[3], mask, key_lengths is not None, pv, out.dtype)
    bm, bn = _tiles(quantized, block_n)
    return args, meta | dict(BLOCK_M=bm, BLOCK_N=bn, K_BLOCK=quantized.block_k)
