"""Joint attention over [video | reference | context] streams (given by offsets) on pre-rotated Q/K: masks,
the float64 oracle, the SDPA path."""
from .reference import (
    EXPORTED_MASKS,
    MASK_IDS,
    MASK_MODES,
    attention_mask,
    check_streams,
    joint_attention_reference,
    rotated_attention_reference,
    rotated_attention_sdpa,
)

__all__ = ["EXPORTED_MASKS", "MASK_IDS", "MASK_MODES", "attention_mask", "check_streams", "joint_attention_reference", "rotated_attention_reference",
           "rotated_attention_sdpa"]
