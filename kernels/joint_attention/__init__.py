"""Joint attention over concatenated streams with in-kernel RoPE, per-view logit scales and masks."""
from .reference import MASK_MODES, attention_mask, joint_attention_reference

__all__ = ["MASK_MODES", "attention_mask", "joint_attention_reference"]
