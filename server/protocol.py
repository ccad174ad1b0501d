"""The request contract of the served ``mvgen`` models, declared once.

The repository generator writes these names into ``config.pbtxt``, the ``mvgen`` model parses requests
with them, the client builds requests from them and ``server/README.md``'s table lists them. Triton fixes
one data type per input name, so an image comes either encoded (``first_frame``: BYTES) or as pixels
(``first_frame_rgb``: UINT8) under two names; give one of the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.errors import RequestError


@dataclass(frozen=True)
class Field:
    name: str
    triton_type: str  # TYPE_* of config.pbtxt
    dims: tuple[int, ...]
    optional: bool
    doc: str

    @property
    def wire_type(self) -> str:
        """The KServe v2 datatype a client sends (``BYTES``, ``UINT8``, ...)."""
        return "BYTES" if self.triton_type == "TYPE_STRING" else self.triton_type.removeprefix("TYPE_")


INPUTS: tuple[Field, ...] = (
    Field("prompt", "TYPE_STRING", (1,), False, "text prompt (UTF-8)"),
    Field("negative_prompt", "TYPE_STRING", (1,), True, "negative prompt for classifier-free guidance (default empty)"),
    Field("first_frame", "TYPE_STRING", (1,), True, "first frame, encoded PNG/JPEG/WebP; this or `first_frame_rgb`"),
    Field("first_frame_rgb", "TYPE_UINT8", (-1, -1, 3), True, "first frame as RGB pixels [H, W, 3]"),
    Field("references", "TYPE_STRING", (-1,), True, "R reference views, encoded images [R]; or `references_rgb`"),
    Field("references_rgb", "TYPE_UINT8", (-1, -1, -1, 3), True, "R reference views as RGB pixels [R, H, W, 3]"),
    Field("first_frame_mask", "TYPE_STRING", (1,), True, "inpainting mask, encoded image, white = person region"),
    Field("first_frame_mask_rgb", "TYPE_UINT8", (-1, -1), True, "inpainting mask as pixels [H, W], > 127 = masked"),
    Field("num_frames", "TYPE_INT32", (1,), True, "frames, 4k+1 (default: the model's)"),
    Field("height", "TYPE_INT32", (1,), True, "multiple of 16 (default: the model's)"),
    Field("width", "TYPE_INT32", (1,), True, "multiple of 16 (default: the model's)"),
    Field("steps", "TYPE_INT32", (1,), True, "denoising steps > 0 (default: the model's)"),
    Field("guidance_scale", "TYPE_FP32", (1,), True, "classifier-free guidance >= 0; <= 1 turns it off"),
    Field("seed", "TYPE_UINT64", (1,), True, "noise seed (default 0)"),
    Field("shift", "TYPE_FP32", (1,), True, "flow-matching sigma shift > 0 (default: the model's)"),
)
OUTPUTS: tuple[Field, ...] = (
    Field("video", "TYPE_UINT8", (-1, -1, -1, 3), False, "frames [F, H, W, 3] (final response)"),
    Field("progress", "TYPE_INT32", (2,), False, "(step, total); one response per step, streaming model only"),
)
INPUT_BY_NAME = {f.name: f for f in INPUTS}
NUMBERS = ("num_frames", "height", "width", "steps", "guidance_scale", "seed", "shift")
# one image input, given encoded (BYTES) or as pixels (UINT8)
IMAGE_PAIRS = {"first_frame": "first_frame_rgb", "references": "references_rgb", "first_frame_mask": "first_frame_mask_rgb"}


def request_arguments(get: Callable[[str], np.ndarray | None]) -> dict:
    """Keyword arguments of ``MultiViewPipeline.make_request`` from a request's tensors.

    ``get(name)`` returns the named input as a numpy array, or None when the request lacks it. Raises
    ``RequestError`` naming the input for a missing one, a wrong element count, or an image given twice.
    """
    prompt = get("prompt")
    if prompt is None:
        raise RequestError("missing input 'prompt' (BYTES [1])")
    args = {"prompt": _text("prompt", prompt)}
    negative = get("negative_prompt")
    if negative is not None:
        args["negative_prompt"] = _text("negative_prompt", negative)
    images = {name: _image(name, get(name), get(raw)) for name, raw in IMAGE_PAIRS.items()}
    if images["first_frame"] is None:
        raise RequestError("missing input 'first_frame' (encoded image, BYTES [1]) or 'first_frame_rgb' (UINT8 [H, W, 3])")
    args["first_frame"] = images["first_frame"]
    args["first_frame_mask"] = images["first_frame_mask"]
    args["references"] = list(images["references"]) if images["references"] is not None else []
    for name in NUMBERS:
        value = get(name)
        if value is not None:
            args[name] = _scalar(name, value)
    return args


def _text(name: str, value: np.ndarray) -> str:
    if value.size != 1:
        raise RequestError(f"input '{name}' must hold one string, got {value.size}")
    item = value.reshape(-1)[0]
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input '{name}' is not valid UTF-8 text") from None
    return str(item)


def _image(name: str, encoded: np.ndarray | None, pixels: np.ndarray | None):
    raw = IMAGE_PAIRS[name]
    if encoded is not None and pixels is not None:
        raise RequestError(f"give '{name}' (encoded) or '{raw}' (pixels), not both")
    if pixels is not None:
        return pixels  # [H, W, 3] / [R, H, W, 3] / [H, W]: rows are images
    if encoded is None:
        return None
    items = [bytes(item) for item in encoded.reshape(-1)]
    if name != "references":
        if len(items) != 1:
            raise RequestError(f"input '{name}' must hold one encoded image, got {len(items)}")
        return items[0]
    return items


def _scalar(name: str, value: np.ndarray):
    if value.size != 1:
        raise RequestError(f"input '{name}' must hold one value, got shape {list(value.shape)}")
    return value.reshape(-1)[0].item()


def markdown_table() -> str:
    """The contract as the Markdown table of ``server/README.md``."""
    lines = ["| name | in/out | datatype | shape | required | meaning |", "|---|---|---|---|---|---|"]
    for direction, fields in (("input", INPUTS), ("output", OUTPUTS)):
        for f in fields:
            shape = "[" + ", ".join("-1" if d < 0 else str(d) for d in f.dims) + "]"
            required = "" if direction == "output" else "yes" if not f.optional else "no"
            if f.name in ("first_frame", "first_frame_rgb"):
                required = "one of the two"
            lines.append(f"| `{f.name}` | {direction} | {f.wire_type} | {shape} | {required} | {f.doc} |")
    return "\n".join(lines)
