"""8-bit joint attention (SageAttention's recipe): INT8 QK^T with per-block scales and K smoothing, P.V in FP8
e4m3 (16-bit before sm_89), on the QK prologue's outputs; the float64 reference (CPU path) beside the kernels."""
from .reference import (
    DEFAULT_BLOCKS,
    PV_PRECISIONS,
    QuantizedQK,
    default_pv,
    quantize_qk_reference,
    quantize_v_reference,
    quantized_attention_reference,
)

__all__ = ["DEFAULT_BLOCKS", "PV_PRECISIONS", "QuantizedQK", "default_pv", "quantize_qk_reference", "quantize_v_reference",
           "quantized_attention_reference"]
