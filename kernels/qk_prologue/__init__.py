"""The QK prologue of the joint self-attention: RMSNorm across heads, RoPE from positions, folded scales."""
from .reference import qk_prologue_reference

__all__ = ["qk_prologue_reference"]
