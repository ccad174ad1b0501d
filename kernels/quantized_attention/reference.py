"""float64 references of the 8-bit joint attention (SageAttention's recipe): the test oracle and the CPU path.

Inputs are the QK prologue's outputs (``kernels.qk_prologue``): Q rotated and scaled by ``sm_scale * log2(e)``,
K rotated with its key scales folded in, so ``q . k`` is the base-2 logit; streams, masks and key lengths as
``kernels.joint_attention.rotated_attention_reference``. The arithmetic, step by step (the kernel does the same
in fp32 registers, with the same roundings to int8 and e4m3):

1. K smoothing: ``k_mean[b, h]`` = the mean of K over all keys of the row (padding included). Subtracting one
   vector from every key shifts each query's logits by the constant ``q . k_mean``, so the softmax is unchanged
   under every mask, while the INT8 range is no longer spent on the channels' common offset.
2. Per-block INT8: Q in blocks of ``block_q`` tokens of one head (the kernel's query tile), K in blocks of
   ``block_k`` keys (its key tile), blocks at multiples of the block size: ``amax = max(max|x|, AMAX_FLOOR)``,
   ``scale = amax / 127``, ``x8 = round_half_even(x * 127 / amax)``. The floor keeps a zero block's scale
   positive (its codes are 0), so ``scale_q * scale_k`` never underflows to 0 and the kernel can fold it into one
   fused multiply-add of the exponent.
3. Logits ``(q8 . k8) * scale_q * scale_k`` (integer products: exact here, int32 in the kernel).
4. P.V in FP8 e4m3 (``pv="fp8"``): ``p = 448 * 2**(logit - rowmax)`` rounded to e4m3 (nearest even,
   saturating: 448 is e4m3's largest value, so P spends the whole range), V per channel over all keys of the
   row: ``v_scale = max(max_n |v|, AMAX_FLOOR) / 448``, ``v8 = e4m3(v / v_scale)``; ``out = (p8 @ v8) * v_scale /
   sum(p)`` with the sum of the unrounded p. In 16 bits (``pv="16bit"``, the sm_80 fallback): p rounded to V's
   dtype, V as given. The kernel rounds P against the running maximum of its key tiles, this reference against
   the row's final maximum: the same relative rounding of the same values, in another order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..joint_attention.reference import attention_mask

PV_PRECISIONS = ("fp8", "16bit")  # how P.V is multiplied: e4m3 (sm_89 and newer) or V's own 16-bit dtype
INT8_MAX = 127
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
AMAX_FLOOR = 1e-15  # two floored scales multiply to ~6e-35, above fp32's smallest normal (1.2e-38)
DEFAULT_BLOCKS = (128, 128)  # (block_q, block_k): the kernel's Hopper tiles, which the CPU path reproduces


@dataclass(frozen=True)
class QuantizedQK:
    """INT8 Q/K in the prologue's layout [B, N, H, D] with per-block fp32 scales [B, H, cdiv(N, block)], the
    block sizes, and K's smoothing mean [B, H, D] fp32 (zeros when not smoothed)."""

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor
    block_q: int
    block_k: int


def default_pv(device: torch.device) -> str:
    """FP8 P.V where the GPU multiplies e4m3 (sm_89 and newer) and on the CPU (whose reference reproduces the
    Hopper arithmetic), 16 bits before sm_89."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return "16bit"
    return PV_PRECISIONS[0]


def check_pv(pv: str) -> None:
    if pv not in PV_PRECISIONS:
        raise ValueError(f"pv must be one of {PV_PRECISIONS}, got {pv!r}")


def check_blocks(block_q: int, block_k: int) -> None:
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if not (isinstance(block, int) and block >= 16 and block & (block - 1) == 0):
            raise ValueError(f"{name} must be a power of two >= 16 (a tile of the kernel), got {block!r}")


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64) rounded to float8_e4m3fn's grid, nearest even, saturating at +-448 (the kernel's
    ``cvt.rn.satfinite``), as float64."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float64)


def _block_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, N, H, D] float64 -> (int8 codes [B, N, H, D], fp32 scales [B, H, cdiv(N, block)])."""
    b, n, h, d = x.shape
    blocks = math.ceil(n / block)
    padded = x.new_zeros(b, blocks * block, h, d)
    padded[:, :n] = x
    tiles = padded.unflatten(1, (blocks, block))  # [B, blocks, block, H, D]
    amax = tiles.abs().amax(dim=(2, 4)).clamp_min(AMAX_FLOOR)  # [B, blocks, H]
    codes = torch.round(tiles * (INT8_MAX / amax)[:, :, None, :, None]).clamp(-INT8_MAX, INT8_MAX)
    scale = (amax / INT8_MAX).to(torch.float32).transpose(1, 2).contiguous()  # [B, H, blocks]
    return codes.flatten(1, 2)[:, :n].to(torch.int8), scale


def quantize_qk_reference(q: torch.Tensor, k: torch.Tensor, *, block_q: int = DEFAULT_BLOCKS[0],
                          block_k: int = DEFAULT_BLOCKS[1], smooth: bool = True) -> QuantizedQK:
    """Steps 1-2 of the module docstring on prologue outputs q [B, Nq, H, D], k [B, Nk, H, D]."""
    check_blocks(block_q, block_k)
    k64 = k.to(torch.float64)
    mean = k64.mean(1) if smooth and k.shape[1] else k64.new_zeros(k.shape[0], k.shape[2], k.shape[3])
    q8, q_scale = _block_int8(q.to(torch.float64), block_q)
    k8, k_scale = _block_int8(k64 - mean[:, None], block_k)
    return QuantizedQK(q8, q_scale, k8, k_scale, mean.to(torch.float32), block_q, block_k)


def quantize_v_reference(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V [B, N, H, D] -> (e4m3 codes [B, N, H, D] as float64, fp32 per-channel scales [B, H, D])."""
    v64 = v.to(torch.float64)
    amax = v64.abs().amax(1).clamp_min(AMAX_FLOOR) if v.shape[1] else v64.new_full(
        (v.shape[0], v.shape[2], v.shape[3]), AMAX_FLOOR)  # [B, H, D]
    return round_e4m3(v64 * (FP8_MAX / amax)[:, None]), (amax / FP8_MAX).to(torch.float32)


def dequantized_logits(qk: QuantizedQK) -> torch.Tensor:
    """Step 3: base-2 logits [B, H, Nq, Nk] in float64 from the INT8 codes and their block scales."""
    q_scale = qk.q_scale.double().repeat_interleave(qk.block_q, -1)[..., :qk.q.shape[1]]  # [B, H, Nq]
    k_scale = qk.k_scale.double().repeat_interleave(qk.block_k, -1)[..., :qk.k.shape[1]]  # [B, H, Nk]
    dots = torch.einsum("bihd,bjhd->bhij", qk.q.double(), qk.k.double())  # exact: |sum| < 2**53
    return dots * q_scale[..., :, None] * k_scale[..., None, :]


def quantized_attention_reference(q, k, v, *, q_offsets, k_offsets, key_lengths=None, mask="full",
                                  tokens_per_frame=1, proto_tokens=1, pv="fp8", block_q=DEFAULT_BLOCKS[0],
                                  block_k=DEFAULT_BLOCKS[1], smooth=True, out=None):
    """The 8-bit attention on prologue outputs q [B, Nq, H, D], k/v [B, Nk, H, D] (module docstring), in q's dtype
    (or written to ``out``); a query with no allowed key gives NaN (0 in the kernel)."""
    check_pv(pv)
    allowed = attention_mask(q.shape[1], k.shape[1], q_offsets, k_offsets, mask, tokens_per_frame, proto_tokens,
                              q.device, key_lengths)
    logits = dequantized_logits(quantize_qk_reference(q, k, block_q=block_q, block_k=block_k, smooth=smooth))
    if allowed is not None:
        logits = logits.masked_fill(~allowed.reshape((-1, 1) + allowed.shape[-2:]), float("-inf"))
    p = torch.exp2(logits - logits.amax(-1, keepdim=True))  # [B, H, Nq, Nk]; NaN on rows with no key
    if pv == "fp8":
        v8, v_scale = quantize_v_reference(v)
        result = torch.einsum("bhij,bjhd->bihd", round_e4m3(p * FP8_MAX), v8)
        result = result * v_scale.double()[:, None] / (p.sum(-1) * FP8_MAX).transpose(1, 2)[..., None]
    else:
        p16 = p.to(v.dtype).to(torch.float64)
        result = torch.einsum("bhij,bjhd->bihd", p16, v.double()) / p.sum(-1).transpose(1, 2)[..., None]
    result = result.to(q.dtype)
    return result if out is None else out.copy_(result)
