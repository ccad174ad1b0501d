"""mvgen engine: the multi-view reference denoiser, its loading and the in-process pipeline."""
from .config import MvgenConfig
from .denoiser import MultiViewWanTransformer, ReferenceCache
from .errors import RequestError
from .loading import load_denoiser
from .pipeline import MultiViewPipeline
from .tiny import ensure_tiny

__all__ = ["MvgenConfig", "MultiViewWanTransformer", "ReferenceCache", "RequestError", "load_denoiser",
           "MultiViewPipeline", "ensure_tiny"]
