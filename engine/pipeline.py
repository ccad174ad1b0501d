"""The in-process multi-view video pipeline: the generation loop over local stages.

``MultiViewPipeline`` holds a ``Checkpoint`` and the components it loaded (the family's text encoder, image
encoder where the checkpoint has CLIP, the family's VAE, one denoiser per expert); ``engine.generation`` runs the
loop, the same loop the server runs over its sub-models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import generation
from .checkpoint import Checkpoint, VaeTiling
from .runtime.denoiser import Denoiser
from .backbones.wan.components import ImageEncoder, TextEncoder, Vae
from .backbones.registry import text_encoder_class, vae_class
from .generation import Generation
from .tiny import default_cache_root
from .request import GenerationRequest, make_request
from .validation import DEFAULT_MAX_TOKENS

Callback = Callable[[int, int], None]


class LocalStages:
    """``engine.generation.Stages`` over components loaded in this process."""

    def __init__(self, text_encoder: TextEncoder, image_encoder: ImageEncoder | None, vae: Vae,
                 denoisers: Sequence[Denoiser], reference_cache: bool = True):
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.vae = vae
        self.denoisers = tuple(denoisers)  # one per expert of the checkpoint
        self.reference_cache = reference_cache

    @property
    def caches_references(self) -> bool:
        return self.reference_cache and any(d.caches_references for d in self.denoisers)

    @property
    def caches_requests(self) -> bool:
        return any(d.caches_requests for d in self.denoisers)

    def encode_text(self, texts):
        return self.text_encoder(texts)

    def encode_image(self, frame):
        return self.image_encoder(frame)

    def encode_condition(self, frame, known, num_frames):
        return self.vae.encode_condition(frame, known, num_frames)

    def encode_references(self, images):
        return self.vae.encode_references(images)

    def denoise(self, inputs, cache_key, expert, cache_references):
        return self.denoisers[expert](inputs, cache_key, cache_references)

    def release(self, cache_key):
        for denoiser in self.denoisers:
            denoiser.release(cache_key)

    def decode(self, latents):
        return self.vae.decode(latents)


class MultiViewPipeline:
    """Text/image encoders, the VAE (Wan's or HunyuanVideo's), flow-matching scheduler and the multi-view denoiser,
    in one process."""

    def __init__(self, checkpoint: Checkpoint, stages: LocalStages):
        self.checkpoint = checkpoint
        self.stages = stages

    @classmethod
    def from_pretrained(cls, model: str | Path = "tiny", adapter: str | Path | None = None,
                        dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                        scheduler: str = "unipc", max_tokens: int = DEFAULT_MAX_TOKENS,
                        cache_root: str | Path | None = None, reference_cache: bool = True, offload: str = "none",
                        vae_tiling: bool | dict | VaeTiling | None = None,
                        **config_overrides) -> "MultiViewPipeline":
        """Load a diffusers Wan directory (Wan2.1-T2V/I2V, Wan2.2-I2V-A14B) or an embedded ``tiny*`` model (with
        its bundled adapters) plus an adapter; ``config_overrides`` may also hold ``Checkpoint.load``'s
        keywords (``adapter_2``, ``loras``, ``loras_2``, ``lora_reference``, ``transformer_file``, ...).

        The denoiser and text encoder run in ``dtype`` (``"auto"``: ``components.default_dtype``; norms and
        modulation tables stay float32); the VAE and CLIP image encoder stay float32 as in diffusers' Wan
        example. ``config_overrides`` go to the denoiser's ``MvgenConfig``. ``reference_cache`` False recomputes
        the reference stream at every step even where its K/V could be kept. Memory: ``offload`` ``"model"`` or
        ``"block"`` keeps the denoiser in host memory between calls (``engine.runtime.offload``; needs an accelerator),
        ``vae_tiling`` (True or a ``VaeTiling``) encodes and decodes in spatial tiles.
        """
        if cache_root is None:  # the environment is read by entry points only (the command line)
            cache_root = default_cache_root({})
        checkpoint = Checkpoint.load(model, adapter, dtype=dtype, device=device, scheduler=scheduler,
                                     max_tokens=max_tokens, cache_root=cache_root, offload=offload,
                                     vae_tiling=vae_tiling, **config_overrides)
        return cls.from_checkpoint(checkpoint, reference_cache)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, reference_cache: bool = True) -> "MultiViewPipeline":
        """Load every component of an already described checkpoint (the CLI validates a request against the
        weightless ``Checkpoint`` before it pays for this)."""
        image_encoder = ImageEncoder(checkpoint) if checkpoint.has_image_encoder else None
        denoisers = [Denoiser(checkpoint, expert) for expert in range(len(checkpoint.experts))]
        text_encoder, vae = text_encoder_class(checkpoint)(checkpoint), vae_class(checkpoint)(checkpoint)
        stages = LocalStages(text_encoder, image_encoder, vae, denoisers, reference_cache)
        return cls(checkpoint, stages)

    @property
    def config(self):
        return self.checkpoint.config

    @property
    def defaults(self) -> dict:
        return self.checkpoint.defaults

    @property
    def limits(self):
        return self.checkpoint.limits

    @property
    def denoiser(self):
        """The (first expert's) ``MultiViewWanTransformer`` module."""
        return self.stages.denoisers[0].model

    # ---- requests -----------------------------------------------------------------------------------------
    def make_request(self, **fields) -> GenerationRequest:
        """Fill unset values from this model's defaults and validate (raises ``RequestError``); the keywords
        are the fields of ``engine.request.FIELDS`` (first_frame, references, prompt, ..., ref_size)."""
        return make_request(self.defaults, self.limits, **fields)

    # ---- the loop, in pieces (tests and benchmarks drive them one by one) -----------------------------------
    def prepare(self, request: GenerationRequest) -> Generation:
        return generation.prepare(self.checkpoint, request, self.stages)

    def predict_velocity(self, state: Generation, timestep: torch.Tensor) -> torch.Tensor:
        return generation.predict_velocity(state, self.stages, timestep)

    def denoise(self, state: Generation, callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
        return generation.denoise(state, self.stages, _on_step(callback), progress=progress)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return self.stages.decode(latents)

    def encode_references(self, images: Sequence[np.ndarray], height: int, width: int, fit: str = "crop"
                          ) -> torch.Tensor | None:
        """Reference views fitted to [height, width] and VAE-encoded: [1, R, 16, height/8, width/8], or None."""
        views = generation.fit_references(images, (height, width), fit)
        return self.stages.encode_references(views) if views is not None else None

    def condition_frame(self, first_frame: np.ndarray, mask: np.ndarray | None, height: int, width: int):
        return generation.condition_frame(self.checkpoint, first_frame, mask, height, width)

    def prepare_condition(self, first_frame: np.ndarray, mask: np.ndarray | None, num_frames: int, height: int,
                          width: int) -> torch.Tensor:
        frame, known = self.condition_frame(first_frame, mask, height, width)
        return self.stages.encode_condition(frame, known, num_frames)

    # ---- one call -----------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, callback: Callback | None = None,
                 progress: bool = False) -> np.ndarray:
        """A validated request -> frames uint8 [F, H, W, 3]."""
        return generation.generate(self.checkpoint, request, self.stages, _on_step(callback), progress=progress)

    def __call__(self, first_frame=None, references: Sequence = (), prompt: str = "", negative_prompt: str = "", *,
                 callback: Callback | None = None, progress: bool = False, **fields) -> np.ndarray:
        """Validate (``RequestError`` on bad input), generate, and return frames uint8 [F, H, W, 3]. T2V
        checkpoints take no ``first_frame`` (reference-to-video from ``references`` and the prompt)."""
        request = self.make_request(first_frame=first_frame, references=references, prompt=prompt,
                                    negative_prompt=negative_prompt, **fields)
        return self.generate(request, callback, progress)


def _on_step(callback: Callback | None) -> generation.StepCallback | None:
    """The public ``callback(step, total)`` as the loop's ``on_step(step, total, seconds)``."""
    return (lambda step, total, seconds: callback(step, total)) if callback is not None else None
