"""mvgen engine: the multi-view reference denoiser, its loading and the in-process pipeline."""
from .config import MvgenConfig
from .denoiser import MultiViewWanTransformer, ReferenceCache

__all__ = ["MvgenConfig", "MultiViewWanTransformer", "ReferenceCache"]
