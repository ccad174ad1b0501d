"""The checks a request's values go through, each refusing in one line that names the value and what is allowed.

Which field gets which check is declared once, in ``engine.request``; these are the primitives and the limits
of a loaded model they compare against. The CLI and the server run the same checks, so they refuse the same
inputs with the same words."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .errors import RequestError

# Wan's VAE: time /4 (+1), space /8; with the DiT's 1x2x2 patches a token covers 16x16 pixels of 4 frames
VAE_SCALE_TEMPORAL = 4
VAE_SCALE_SPATIAL = 8
DEFAULT_MAX_TOKENS = 131_072
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class RequestLimits:
    """What a loaded model accepts (from its config), plus the serving budget on sequence length."""

    max_references: int
    max_tokens: int = DEFAULT_MAX_TOKENS
    spatial_multiple: int = VAE_SCALE_SPATIAL * 2  # VAE x patch
    temporal_multiple: int = VAE_SCALE_TEMPORAL
    first_frame: bool = True  # image-to-video: a first frame is required (T2V: refused)
    first_frame_optional: bool = False  # TI2V: text- or image-to-video, a first frame taken when given
    experts: int = 1  # denoisers of the checkpoint (Wan2.2-A14B: 2, each with its own guidance scale)
    prototype: bool = False  # ProFashion PPA: pose images per frame and per reference
    identity: bool = False  # M2HVideo: an identity image
    multiview: bool = False  # MVAnimate Eq. 2: per-request view weights


def token_count(limits: RequestLimits, num_frames: int, height: int, width: int, num_refs: int,
                ref_size: tuple[int, int]) -> int:
    """Joint-attention sequence length: video tokens plus reference tokens (one latent frame each)."""
    s = limits.spatial_multiple
    latent_frames = (num_frames - 1) // limits.temporal_multiple + 1
    return latent_frames * (height // s) * (width // s) + num_refs * (ref_size[0] // s) * (ref_size[1] // s)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integer(name: str, value, allowed: str, ok) -> int:
    if not is_int(value) or not ok(int(value)):
        raise RequestError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_number(name: str, value, allowed: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise RequestError(f"{name} must be a number {allowed}, got {value!r}")
    return float(value)


def check_multiple(name: str, value, multiple: int) -> int:
    if is_int(value) and value > 0 and value % multiple == 0:
        return int(value)
    hint = ""
    if is_int(value) and value > 0:
        lower = max(multiple, value // multiple * multiple)
        hint = f" (nearest: {lower} or {lower + multiple})" if lower < value else f" (nearest: {lower})"
    raise RequestError(f"{name} must be a positive multiple of {multiple}, got {value!r}{hint}")


def check_frame_count(name: str, value, multiple: int) -> int:
    if is_int(value) and value > 0 and value % multiple == 1 % multiple:
        return int(value)
    hint = ""
    if is_int(value) and value > 0:
        lower = (value - 1) // multiple * multiple + 1
        hint = f" (nearest: {lower} or {lower + multiple})"
    raise RequestError(
        f"{name} must be {multiple}k+1 (1, {1 + multiple}, {1 + 2 * multiple}, ..., 81), got {value!r}{hint}"
    )
