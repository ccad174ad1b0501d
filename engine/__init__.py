"""mvgen engine: the multi-view reference denoiser, the checkpoint's components, the one generation loop.

The names below are imported on first use (PEP 562), so ``import engine.request`` costs only what that module needs:
a server's stubs, workers and the CLI import the one part they run, not every family's model code."""
from importlib import import_module

# exported name -> the module that defines it
EXPORTS = {
    "LoraSpec": "engine.adapters.base_lora", "Checkpoint": "engine.checkpoint", "Expert": "engine.checkpoint",
    "Denoiser": "engine.runtime.denoiser", "ImageEncoder": "engine.backbones.wan.components",
    "TextEncoder": "engine.backbones.wan.components", "Vae": "engine.backbones.wan.components",
    "MvgenConfig": "engine.config", "MultiViewWanTransformer": "engine.backbones.wan.model",
    "ReferenceCache": "engine.runtime.caches", "RequestError": "engine.errors", "generate": "engine.generation",
    "load_denoiser": "engine.backbones.registry", "LocalStages": "engine.pipeline",
    "MultiViewPipeline": "engine.pipeline", "ensure_tiny": "engine.tiny",
}
__all__ = list(EXPORTS)


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(import_module(EXPORTS[name]), name)
