"""The one place a generation request is checked: the CLI and the server refuse the same inputs, same words."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import RequestError
from .media import ImageSource, load_image

# Wan's VAE: time /4 (+1), space /8; with the DiT's 1x2x2 patches a token covers 16x16 pixels of 4 frames
VAE_SCALE_TEMPORAL = 4
VAE_SCALE_SPATIAL = 8
DEFAULT_MAX_TOKENS = 131_072
MAX_SEED = 2**64 - 1

__all__ = ["RequestError", "RequestLimits", "GenerationRequest", "validate_request", "token_count"]


@dataclass(frozen=True)
class RequestLimits:
    """What a loaded model accepts (from its config), plus the serving budget on sequence length."""

    max_references: int
    max_tokens: int = DEFAULT_MAX_TOKENS
    spatial_multiple: int = VAE_SCALE_SPATIAL * 2  # VAE x patch
    temporal_multiple: int = VAE_SCALE_TEMPORAL

    @classmethod
    def from_config(cls, config, max_tokens: int = DEFAULT_MAX_TOKENS) -> "RequestLimits":
        _, patch_h, patch_w = config.patch_size
        return cls(config.max_references, max_tokens, VAE_SCALE_SPATIAL * max(patch_h, patch_w), VAE_SCALE_TEMPORAL)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: decoded images (RGB uint8 [H, W, 3]) and checked numbers."""

    first_frame: np.ndarray
    references: tuple[np.ndarray, ...]
    prompt: str
    negative_prompt: str
    num_frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    shift: float
    first_frame_mask: np.ndarray | None = None  # bool [H, W] of the first frame, True = masked (unknown)
    ref_size: tuple[int, int] | None = None  # (height, width) of the references; None = the video size

    @property
    def reference_size(self) -> tuple[int, int]:
        return self.ref_size or (self.height, self.width)


def token_count(limits: RequestLimits, num_frames: int, height: int, width: int, num_refs: int,
                ref_size: tuple[int, int]) -> int:
    """Joint-attention sequence length: video tokens plus reference tokens (one latent frame each)."""
    s = limits.spatial_multiple
    latent_frames = (num_frames - 1) // limits.temporal_multiple + 1
    return latent_frames * (height // s) * (width // s) + num_refs * (ref_size[0] // s) * (ref_size[1] // s)


def validate_request(
    limits: RequestLimits,
    *,
    first_frame: ImageSource,
    references: Sequence[ImageSource] = (),
    prompt: str,
    negative_prompt: str = "",
    first_frame_mask: ImageSource | None = None,
    num_frames: int,
    height: int,
    width: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    shift: float,
    ref_size: Sequence[int] | None = None,
) -> GenerationRequest:
    """Check every field (numbers first, then decode the images); raise ``RequestError`` on the first problem."""
    m, t = limits.spatial_multiple, limits.temporal_multiple
    height = _multiple("height", height, m)
    width = _multiple("width", width, m)
    num_frames = _frames(num_frames, t)
    steps = _integer("steps", steps, "a positive integer (e.g. 4 to 50)", lambda v: v > 0)
    guidance_scale = _number("guidance_scale", guidance_scale, ">= 0 (1 or less disables classifier-free guidance)",
                             lambda v: v >= 0)
    seed = _integer("seed", seed, f"an integer in [0, {MAX_SEED}]", lambda v: 0 <= v <= MAX_SEED)
    shift = _number("shift", shift, "> 0 (Wan uses 3.0 at 480p, 5.0 at 720p)", lambda v: v > 0)
    if ref_size is not None:
        if isinstance(ref_size, (str, bytes)) or len(ref_size) != 2:
            raise RequestError(f"ref_size must be (height, width), got {ref_size!r}")
        ref_size = (_multiple("reference height", ref_size[0], m), _multiple("reference width", ref_size[1], m))
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            raise RequestError(f"{name} must be text, got {type(text).__name__}")

    references = list(references)
    if len(references) > limits.max_references:
        raise RequestError(
            f"got {len(references)} references, this model takes at most {limits.max_references} (max_references)"
        )
    tokens = token_count(limits, num_frames, height, width, len(references), ref_size or (height, width))
    if tokens > limits.max_tokens:
        raise RequestError(
            f"{num_frames} frames at {height}x{width} with {len(references)} reference(s) make {tokens} tokens, "
            f"more than the limit of {limits.max_tokens}; lower frames, size, or references"
        )

    frame = load_image(first_frame, "first frame")
    refs = tuple(load_image(image, f"reference {i + 1}") for i, image in enumerate(references))
    mask = None
    if first_frame_mask is not None:
        mask_rgb = load_image(first_frame_mask, "first-frame mask")
        if mask_rgb.shape[:2] != frame.shape[:2]:
            raise RequestError(
                f"first-frame mask is {mask_rgb.shape[1]}x{mask_rgb.shape[0]} but the first frame is "
                f"{frame.shape[1]}x{frame.shape[0]}; they must be the same size"
            )
        mask = mask_rgb.mean(axis=-1) > 127.5  # white = person region to mask out
    return GenerationRequest(
        first_frame=frame, references=refs, prompt=prompt, negative_prompt=negative_prompt, num_frames=num_frames,
        height=height, width=width, steps=steps, guidance_scale=guidance_scale, seed=seed, shift=shift,
        first_frame_mask=mask, ref_size=ref_size,
    )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _integer(name: str, value, allowed: str, ok) -> int:
    if not _is_int(value) or not ok(int(value)):
        raise RequestError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _number(name: str, value, allowed: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise RequestError(f"{name} must be a number {allowed}, got {value!r}")
    return float(value)


def _multiple(name: str, value, multiple: int) -> int:
    if _is_int(value) and value > 0 and value % multiple == 0:
        return int(value)
    hint = ""
    if _is_int(value) and value > 0:
        lower = max(multiple, value // multiple * multiple)
        hint = f" (nearest: {lower} or {lower + multiple})" if lower < value else f" (nearest: {lower})"
    raise RequestError(f"{name} must be a positive multiple of {multiple}, got {value!r}{hint}")


def _frames(value, multiple: int) -> int:
    if _is_int(value) and value > 0 and value % multiple == 1 % multiple:
        return int(value)
    hint = ""
    if _is_int(value) and value > 0:
        lower = (value - 1) // multiple * multiple + 1
        hint = f" (nearest: {lower} or {lower + multiple})"
    raise RequestError(
        f"frames must be {multiple}k+1 (1, {1 + multiple}, {1 + 2 * multiple}, ..., 81), got {value!r}{hint}"
    )
