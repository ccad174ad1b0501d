"""What each served model computes, over ``engine``: loading, the encoders, the denoiser batch, the loop.

The Triton adapters (``server/models.py``) only move tensors in and out; everything here runs without
Triton, on the in-process ``MultiViewPipeline`` stages, so the server is never a second implementation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from engine.media import fit_image
from engine.pipeline import MultiViewPipeline
from engine.request import GenerationRequest

# which pipeline parts each served model uses; the rest is released after loading
PARTS = {
    "mvgen": (),
    "mvgen_text_encoder": ("tokenizer", "text_encoder"),
    "mvgen_image_encoder": ("image_processor", "image_encoder"),
    "mvgen_vae": ("vae",),
    "mvgen_denoiser": (),
}
_RELEASABLE = ("tokenizer", "text_encoder", "image_processor", "image_encoder")


@dataclass(frozen=True)
class ServedModel:
    """The settings every served model reads from its ``config.pbtxt`` parameters (written by the generator)."""

    model: str
    adapter: str | None
    dtype: str = "float32"
    device: str = "cpu"
    scheduler: str = "unipc"
    max_tokens: int = 131_072
    overrides: str = "{}"

    @classmethod
    def from_parameters(cls, parameters: dict) -> "ServedModel":
        values = {k: v["string_value"] for k, v in parameters.items() if k in cls.__dataclass_fields__}
        values["adapter"] = values.get("adapter") or None
        if "max_tokens" in values:
            values["max_tokens"] = int(values["max_tokens"])
        return cls(**values)

    def load(self, name: str) -> MultiViewPipeline:
        """The pipeline with only the parts model ``name`` uses kept in memory."""
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = MultiViewPipeline.from_pretrained(
            self.model, adapter=self.adapter, dtype=getattr(torch, self.dtype), device=device,
            scheduler=self.scheduler, max_tokens=self.max_tokens, **json.loads(self.overrides),
        )
        keep = PARTS[name]
        for part in _RELEASABLE:
            if part not in keep:
                setattr(pipe, part, None)
        return pipe


class Stages(Protocol):
    """The once-per-request encoders, the per-step denoiser and the decoder, wherever they run."""

    def text(self, prompt: str, negative_prompt: str | None) -> torch.Tensor: ...  # [B, 512, text_dim]
    def image(self, first_frame: np.ndarray, mask: np.ndarray | None, height: int, width: int) -> torch.Tensor: ...
    def condition(self, first_frame, mask, num_frames: int, height: int, width: int) -> torch.Tensor: ...
    def references(self, images: np.ndarray, height: int, width: int) -> torch.Tensor: ...
    def denoise(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor) -> np.ndarray: ...


class Cancelled(Exception):
    """The client went away; the loop stopped."""


def generate(pipe: MultiViewPipeline, request: GenerationRequest, stages: Stages,
             on_step: Callable[[int, int, float], None] = lambda step, total, seconds: None,
             cancelled: Callable[[], bool] = lambda: False) -> np.ndarray:
    """The scheduler loop of ``MultiViewPipeline.prepare`` + ``denoise`` + ``decode`` over ``stages``.

    Cond and uncond go to the denoiser as one batch of 2 (classifier-free guidance), as in the engine.
    ``cancelled()`` is checked before every stage and step: a cancelled request raises ``Cancelled``
    within one step. ``on_step(step, total, seconds)`` follows every step.
    """
    import time

    guided = request.guidance_scale > 1
    stage_calls = (
        lambda: stages.text(request.prompt, request.negative_prompt if guided else None),
        lambda: stages.image(request.first_frame, request.first_frame_mask, request.height, request.width),
        lambda: stages.condition(request.first_frame, request.first_frame_mask, request.num_frames,
                                 request.height, request.width),
        lambda: _references(stages, request),
    )
    results = []
    for call in stage_calls:
        _check(cancelled)
        results.append(call())
    # the server sends the references every step: its denoiser model may be a TensorRT plan without the cache
    state = pipe.assemble_state(request, *results, cache_references=False)
    while not state.done:
        _check(cancelled)
        start = time.perf_counter()
        pipe.denoise_step(state, stages.denoise)
        on_step(state.step_index, state.total_steps, time.perf_counter() - start)
    _check(cancelled)
    return stages.decode(state.latents)


def _check(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise Cancelled("request cancelled by the client")


def _references(stages: Stages, request: GenerationRequest) -> torch.Tensor | None:
    if not request.references:
        return None
    height, width = request.reference_size
    return stages.references(np.stack([fit_image(image, height, width) for image in request.references]), height, width)


# ---- the denoiser's batch -----------------------------------------------------------------------------------
DENOISER_INPUTS = ("latents", "condition", "timestep", "text", "image_context", "ref_latents")


def denoise_batch(denoiser, parts: list[dict[str, torch.Tensor]], pad_to: int = 0) -> list[torch.Tensor]:
    """Run equal-shape requests as one batch and split the velocity back, one tensor per request.

    Rows never interact in the denoiser, but CPU GEMM kernels pick their blocking by the batch size, so a
    request's last bits could depend on who shares its batch. ``pad_to`` > 0 runs every batch at that many
    rows (padding repeats row 0), which makes each request's result independent of its companions.
    """
    sizes = [p["latents"].shape[0] for p in parts]
    batch = {name: torch.cat([p[name] for p in parts]) for name in DENOISER_INPUTS}
    rows = sum(sizes)
    if pad_to > rows:
        batch = {name: torch.cat([t, t[:1].expand(pad_to - rows, *t.shape[1:])]) for name, t in batch.items()}
    refs = batch.pop("ref_latents")
    with torch.no_grad():
        velocity = denoiser(**batch, ref_latents=refs if refs.shape[1] > 0 else None)
    return list(velocity[:rows].split(sizes))
