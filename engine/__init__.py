"""mvgen engine: the multi-view reference denoiser, the checkpoint's components, the one generation loop."""
from .adapters.base_lora import LoraSpec
from .checkpoint import Checkpoint, Expert
from .runtime.denoiser import Denoiser
from .backbones.wan.components import ImageEncoder, TextEncoder, Vae
from .config import MvgenConfig
from .backbones.wan.model import MultiViewWanTransformer
from .runtime.caches import ReferenceCache
from .errors import RequestError
from .generation import generate
from .backbones.registry import load_denoiser
from .pipeline import LocalStages, MultiViewPipeline
from .tiny import ensure_tiny

__all__ = ["LoraSpec", "Checkpoint", "Denoiser", "Expert", "ImageEncoder", "TextEncoder", "Vae", "MvgenConfig", "MultiViewWanTransformer",
           "ReferenceCache", "RequestError", "generate", "load_denoiser", "LocalStages", "MultiViewPipeline",
           "ensure_tiny"]
