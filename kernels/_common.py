"""Helpers shared by the Triton kernels: the interpreter's bf16 emulation and backend selection."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def narrow(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype`` for an MMA operand or a store.

    Triton's interpreter (3.9) truncates fp32 -> bf16 casts and multiplies bf16 ``tl.dot`` operands as their
    raw uint16 bits. Under it launchers set ``EMULATE_BF16``: the value is rounded to the bf16 grid
    (nearest-even, by bit arithmetic) and kept in fp32, which is exactly what the GPU computes.
    """
    if EMULATE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``tl.dot(a, b, acc)``; under the bf16 emulation the (bf16-valued) operands are widened to fp32."""
    if EMULATE_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


def interpreting() -> bool:
    """True when kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when they were decorated)."""
    return not isinstance(narrow, triton.runtime.JITFunction)


def emulate_bf16(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE products (the fp32 tolerance of the tests); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_device(t: torch.Tensor, what: str) -> None:
    if not t.is_cuda and not interpreting():
        raise ValueError(f"the Triton {what} kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")


def check_operand(name: str, t: torch.Tensor, layout: str, first_name: str, first: torch.Tensor,
                  last_dim: str = "its last dim") -> None:
    """What every launcher checks of a tensor operand: rank (``layout`` spells it, e.g. "[B, N, H, D]"),
    an MMA dtype, a unit stride in the last dim (named ``last_dim``), and the device of the ``first`` operand."""
    if t.dim() != layout.count(",") + 1:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in MMA_DTYPES:
        raise ValueError(f"{name} dtype must be one of float16/bfloat16/float32, got {t.dtype}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in {last_dim} (stride(-1) == 1), got strides {t.stride()}")
    if t.device != first.device:
        raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
