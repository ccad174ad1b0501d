"""Small fused element-wise/row-wise ops of the DiT block (AdaLN, gated residual, M2HVideo fusion)."""
from .reference import (
    adaln_layernorm_reference,
    distribution_fusion_reference,
    gated_residual_reference,
)

__all__ = ["adaln_layernorm_reference", "distribution_fusion_reference", "gated_residual_reference"]
