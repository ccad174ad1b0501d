"""The QK prologue of the joint self-attention: RMSNorm (across heads or per head), RoPE from positions,
folded scales."""
from .reference import NORM_MODES, qk_prologue_reference

__all__ = ["NORM_MODES", "qk_prologue_reference"]
