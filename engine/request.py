"""A generation request's fields, declared once.

Each ``RequestField`` says what the field is (name, kind, validated type, default), what it may be (its rule,
in the words every refusal uses), how the command line spells it, and how it travels to the served ``mvgen``
models. Everything else is derived from ``FIELDS``: ``GenerationRequest``, ``validate_request`` and
``make_request`` here; the command-line options (``engine.cli_args.add_request_arguments``); the server's
inputs, their parsing and the README table (``server.protocol``); the client's tensors (``server.client``).
A new field of an existing kind is one entry in ``FIELDS``.

Kinds say how a value is read, sent and checked: ``text``; ``integer`` and ``number`` (scalars); ``numbers``
(a list of them); ``size`` ((height, width)); ``image`` and ``images`` (a path, encoded bytes, a PIL image or
RGB uint8 pixels); ``frames`` (images on the wire; one video file or directory of images on the command line). Triton
fixes one data type per input name, so an image travels either encoded (BYTES) or as pixels (UINT8) under
two names: an image field declares two ``Wire`` inputs, and a request gives one of them.
"""
from __future__ import annotations

from dataclasses import dataclass, make_dataclass
from typing import Mapping

import numpy as np

from .errors import RequestError
from .guidance import GUIDANCE_DEFAULTS, GUIDANCE_RECIPES, RECIPES
from .media import REFERENCE_FITS, load_image
from .validation import (MAX_SEED, RequestLimits, check_frame_count, check_integer, check_multiple, check_number,
                         token_count)

KINDS = ("text", "integer", "number", "numbers", "size", "image", "images", "frames")
IMAGE_KINDS = ("image", "images", "frames")


class _Marker:
    def __init__(self, words: str):
        self.words = words

    def __repr__(self) -> str:
        return self.words


REQUIRED = _Marker("required")
# the first frame: required by image-to-video checkpoints, refused by T2V ones (RequestLimits.first_frame)
I2V_ONLY = _Marker("required on image-to-video models, none on T2V")
# filled by make_request from the checkpoint's generation defaults (mvgen_defaults.json over Wan's)
MODEL_DEFAULT = _Marker("the model's")
# the limits that the command-line help and the README quote (Wan: 16-pixel multiples, 4k+1 frames)
DOC_LIMITS = RequestLimits(max_references=3)


# ---- rules: what a value may be, in the words of its refusal ---------------------------------------------
@dataclass(frozen=True)
class Text:
    """A string (prompts)."""

    def describe(self, limits: RequestLimits) -> str:
        return "UTF-8 text"

    def check(self, name: str, value, limits: RequestLimits) -> str:
        if not isinstance(value, str):
            raise RequestError(f"{name} must be text, got {type(value).__name__}")
        return value


@dataclass(frozen=True)
class OneOf:
    """One of a few words (a guidance recipe, a reference fit)."""

    choices: tuple[str, ...]

    def describe(self, limits: RequestLimits) -> str:
        return f"one of {', '.join(self.choices)}"

    def check(self, name: str, value, limits: RequestLimits) -> str:
        if value not in self.choices:
            raise RequestError(f"{name} must be one of {list(self.choices)}, got {value!r}")
        return value


@dataclass(frozen=True)
class IntegerIn:
    """An integer in [low, high] (no upper bound when ``high`` is None)."""

    low: int
    high: int | None
    words: str  # the allowed values, as the refusal says them

    def describe(self, limits: RequestLimits) -> str:
        return self.words

    def check(self, name: str, value, limits: RequestLimits) -> int:
        return check_integer(name, value, self.words, lambda v: v >= self.low and (self.high is None or v <= self.high))


@dataclass(frozen=True)
class NumberAbove:
    """A finite number above ``bound`` (or equal to it when ``inclusive``)."""

    bound: float
    inclusive: bool
    note: str = ""

    def _words(self) -> str:
        words = f"{'>=' if self.inclusive else '>'} {self.bound:g}"
        return f"{words} ({self.note})" if self.note else words

    def describe(self, limits: RequestLimits) -> str:
        return f"a number {self._words()}"

    def check(self, name: str, value, limits: RequestLimits) -> float:
        ok = (lambda v: v >= self.bound) if self.inclusive else (lambda v: v > self.bound)
        return check_number(name, value, self._words(), ok)


@dataclass(frozen=True)
class Numbers:
    """A list of finite numbers >= 0 (one per reference view)."""

    words: str

    def describe(self, limits: RequestLimits) -> str:
        return self.words

    def check(self, name: str, value, limits: RequestLimits) -> tuple[float, ...]:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise RequestError(f"{name} must be a list of numbers, got {value!r}")
        return tuple(check_number(f"{name} {i + 1}", v, ">= 0", lambda x: x >= 0) for i, v in enumerate(value))


@dataclass(frozen=True)
class PixelMultiple:
    """Pixels the VAE and the patch both divide (16 for Wan: VAE /8 x patch 2)."""

    def describe(self, limits: RequestLimits) -> str:
        return f"a positive multiple of {limits.spatial_multiple}"

    def check(self, name: str, value, limits: RequestLimits) -> int:
        return check_multiple(name, value, limits.spatial_multiple)


@dataclass(frozen=True)
class FrameCount:
    """Frames the VAE's temporal compression takes: one, then groups of 4."""

    def describe(self, limits: RequestLimits) -> str:
        t = limits.temporal_multiple
        return f"{t}k+1 (1, {1 + t}, {1 + 2 * t}, ...)"

    def check(self, name: str, value, limits: RequestLimits) -> int:
        return check_frame_count(name, value, limits.temporal_multiple)


@dataclass(frozen=True)
class PixelSize:
    """(height, width), each a ``PixelMultiple``."""

    def describe(self, limits: RequestLimits) -> str:
        return f"(height, width), each a positive multiple of {limits.spatial_multiple}"

    def check(self, name: str, value, limits: RequestLimits) -> tuple[int, int]:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
            raise RequestError(f"{name} must be (height, width), got {value!r}")
        m = limits.spatial_multiple
        return check_multiple(f"{name} height", value[0], m), check_multiple(f"{name} width", value[1], m)


@dataclass(frozen=True)
class Picture:
    """An image, decoded to RGB uint8 [H, W, 3]; ``label`` names it in refusals."""

    label: str

    def describe(self, limits: RequestLimits) -> str:
        return "an image (PNG/JPEG/WebP)"

    def check(self, name: str, value, limits: RequestLimits) -> np.ndarray:
        return load_image(value, self.label)


@dataclass(frozen=True)
class Pictures:
    """Images, each decoded; refusals name ``label 1``, ``label 2``, ..."""

    label: str

    def describe(self, limits: RequestLimits) -> str:
        return f"images (PNG/JPEG/WebP), at most the model's max_references ({limits.max_references} for MVI2V)"

    def check(self, name: str, value, limits: RequestLimits) -> tuple[np.ndarray, ...]:
        return tuple(load_image(image, f"{self.label} {i + 1}") for i, image in enumerate(value))


@dataclass(frozen=True)
class MaskPicture:
    """An image read as a mask: bool [H, W], True where it is white (the region to take from references)."""

    label: str

    def describe(self, limits: RequestLimits) -> str:
        return "an image of the first frame's size (PNG/JPEG/WebP)"

    def check(self, name: str, value, limits: RequestLimits) -> np.ndarray:
        return load_image(value, self.label).mean(axis=-1) > 127.5


# ---- the declaration -----------------------------------------------------------------------------------------
def wire_type(triton_type: str) -> str:
    """The KServe v2 datatype a client sends for a ``config.pbtxt`` type (``TYPE_STRING`` -> ``BYTES``, ...)."""
    return "BYTES" if triton_type == "TYPE_STRING" else triton_type.removeprefix("TYPE_")


@dataclass(frozen=True)
class Wire:
    """One input of the served ``mvgen`` models."""

    name: str
    triton_type: str  # TYPE_* of config.pbtxt
    dims: tuple[int, ...]
    doc: str = ""  # the README's words for this form, where the field's own do not say which form it is

    @property
    def wire_type(self) -> str:
        return wire_type(self.triton_type)


@dataclass(frozen=True)
class RequestField:
    """One field of a generation request, everything the CLI, the validation and the server need to know."""

    name: str  # keyword of make_request, attribute of GenerationRequest
    kind: str  # one of KINDS
    type: object  # the validated value's type (GenerationRequest's annotation)
    default: object  # REQUIRED, MODEL_DEFAULT, or the value an unset field takes
    rule: object  # Text, IntegerIn, ...: describe(limits) and check(name, value, limits)
    help: str  # what the field is, for the CLI help and the README
    flag: str  # the command line's spelling
    wire: tuple[Wire, ...]  # one input, or (encoded, pixels) for an image
    default_doc: str = ""  # what an unset field means, where its default value does not say it

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"request field {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self, limits: RequestLimits = DOC_LIMITS) -> str:
        """One line for the CLI help and the README: what it is, what it may be, what unset means."""
        return f"{self.help}: {self.rule.describe(limits)}; {self._default_words()}"

    def _default_words(self) -> str:
        if self.default is REQUIRED:
            return "required"
        if self.default is MODEL_DEFAULT:
            return "default: the model's"
        if self.default is I2V_ONLY:
            return "required by image-to-video models (Wan I2V); none on T2V models (reference-to-video)"
        if self.default_doc:
            return f"default: {self.default_doc}"
        return f"default: {self.default!r}" if self.default not in ("", (), None) else "default: none"


FIELDS: tuple[RequestField, ...] = (
    RequestField("prompt", "text", str, REQUIRED, Text(), "text prompt", "--prompt",
                 (Wire("prompt", "TYPE_STRING", (1,)),)),
    RequestField("negative_prompt", "text", str, "", Text(), "negative prompt for classifier-free guidance",
                 "--negative-prompt", (Wire("negative_prompt", "TYPE_STRING", (1,)),), default_doc="empty"),
    RequestField("first_frame", "image", np.ndarray | None, I2V_ONLY, Picture("first frame"), "first frame",
                 "--first-frame",
                 (Wire("first_frame", "TYPE_STRING", (1,),
                       "first frame, encoded PNG/JPEG/WebP; this or `first_frame_rgb`"),
                  Wire("first_frame_rgb", "TYPE_UINT8", (-1, -1, 3), "first frame as RGB pixels [H, W, 3]"))),
    RequestField("references", "images", tuple, (), Pictures("reference"),
                 "reference views (front, back, side, ...)", "--reference",
                 (Wire("references", "TYPE_STRING", (-1,),
                       "R reference views, encoded images [R]; or `references_rgb`"),
                  Wire("references_rgb", "TYPE_UINT8", (-1, -1, -1, 3),
                       "R reference views as RGB pixels [R, H, W, 3]"))),
    RequestField("first_frame_mask", "image", np.ndarray | None, None, MaskPicture("first-frame mask"),
                 "inpainting mask, white = person region to take from the references", "--first-frame-mask",
                 (Wire("first_frame_mask", "TYPE_STRING", (1,),
                       "inpainting mask, encoded image, white = person region"),
                  Wire("first_frame_mask_rgb", "TYPE_UINT8", (-1, -1),
                       "inpainting mask as pixels [H, W], > 127 = masked")),
                 default_doc="no mask"),
    RequestField("frame_pose", "frames", tuple, (), Pictures("frame pose"),
                 "ProFashion PPA (ref_attention=prototype): a rendered pose image per output frame", "--frame-pose",
                 (Wire("frame_pose", "TYPE_STRING", (-1,), "F pose images, encoded [F]; or `frame_pose_rgb`"),
                  Wire("frame_pose_rgb", "TYPE_UINT8", (-1, -1, -1, 3), "F pose images as RGB pixels [F, H, W, 3]")),
                 default_doc="none; required with references on prototype models"),
    RequestField("reference_poses", "images", tuple, (), Pictures("reference pose"),
                 "ProFashion PPA: the rendered pose of each reference view, in their order", "--reference-pose",
                 (Wire("reference_poses", "TYPE_STRING", (-1,), "R pose images, encoded [R]; or `reference_poses_rgb`"),
                  Wire("reference_poses_rgb", "TYPE_UINT8", (-1, -1, -1, 3), "R pose images as RGB pixels [R, H, W, 3]")),
                 default_doc="none; one per reference on prototype models"),
    RequestField("identity", "image", np.ndarray | None, None, Picture("identity image"),
                 "M2HVideo: an identity (face/person) image for the distribution-aware adapter", "--identity",
                 (Wire("identity", "TYPE_STRING", (1,), "identity image, encoded; or `identity_rgb`"),
                  Wire("identity_rgb", "TYPE_UINT8", (-1, -1, 3), "identity image as RGB pixels [H, W, 3]")),
                 default_doc="none (models with the identity adapter only)"),
    RequestField("view_omega", "numbers", tuple, (), Numbers("numbers >= 0, one per reference"),
                 "MVAnimate Eq. 2: per-view weights omega of the attention across views", "--view-omega",
                 (Wire("view_omega", "TYPE_FP32", (-1,)),), default_doc="the adapter's (multiview models only)"),
    RequestField("num_frames", "integer", int, MODEL_DEFAULT, FrameCount(), "frames", "--frames",
                 (Wire("num_frames", "TYPE_INT32", (1,)),)),
    RequestField("height", "integer", int, MODEL_DEFAULT, PixelMultiple(), "video height in pixels", "--height",
                 (Wire("height", "TYPE_INT32", (1,)),)),
    RequestField("width", "integer", int, MODEL_DEFAULT, PixelMultiple(), "video width in pixels", "--width",
                 (Wire("width", "TYPE_INT32", (1,)),)),
    RequestField("steps", "integer", int, MODEL_DEFAULT, IntegerIn(1, None, "a positive integer (e.g. 4 to 50)"),
                 "denoising steps", "--steps", (Wire("steps", "TYPE_INT32", (1,)),)),
    RequestField("guidance_scale", "number", float, MODEL_DEFAULT,
                 NumberAbove(0, True, "1 or less disables classifier-free guidance"), "classifier-free guidance scale",
                 "--guidance-scale", (Wire("guidance_scale", "TYPE_FP32", (1,)),)),
    RequestField("guidance_scale_2", "number", float | None, None, NumberAbove(0, True),
                 "guidance scale of the low-noise expert (Wan2.2's transformer_2)", "--guidance-scale-2",
                 (Wire("guidance_scale_2", "TYPE_FP32", (1,)),), default_doc="guidance_scale; two-expert models only"),
    RequestField("guidance", "text", str, GUIDANCE_DEFAULTS["guidance"], OneOf(GUIDANCE_RECIPES),
                 "guidance recipe: cfg (classifier-free: prompt and negative prompt rows) or phantom (Phantom-Wan's "
                 "three rows: prompt + references, negative prompt + references, negative prompt + zero references; "
                 "guidance_scale is its text scale)", "--guidance", (Wire("guidance", "TYPE_STRING", (1,)),),
                 default_doc="the model's, else 'cfg'"),
    RequestField("guidance_scale_image", "number", float, GUIDANCE_DEFAULTS["guidance_scale_image"],
                 NumberAbove(0, True), "phantom guidance: the reference-image scale (pos_i - neg)",
                 "--guidance-scale-image", (Wire("guidance_scale_image", "TYPE_FP32", (1,)),),
                 default_doc="the model's, else 5.0 (Phantom's)"),
    RequestField("seed", "integer", int, 0, IntegerIn(0, MAX_SEED, f"an integer in [0, {MAX_SEED}]"), "noise seed",
                 "--seed", (Wire("seed", "TYPE_UINT64", (1,)),)),
    RequestField("shift", "number", float, MODEL_DEFAULT, NumberAbove(0, False, "Wan uses 3.0 at 480p, 5.0 at 720p"),
                 "flow-matching sigma shift", "--shift", (Wire("shift", "TYPE_FP32", (1,)),)),
    RequestField("ref_size", "size", tuple | None, None, PixelSize(),
                 "size the references are encoded at (MVI2V: 720x720 references beside a 1280x720 video)",
                 "--ref-size", (Wire("ref_size", "TYPE_INT32", (2,)),), default_doc="the video's size"),
    RequestField("reference_fit", "text", str, REFERENCE_FITS[0], OneOf(REFERENCE_FITS),
                 "how references are fitted to ref_size: crop (centre crop, then resize) or letterbox (Phantom-Wan: "
                 "the whole view resized to fit and padded on white)", "--reference-fit",
                 (Wire("reference_fit", "TYPE_STRING", (1,)),), default_doc="the model's, else 'crop'"),
)


def _reference_size(self) -> tuple[int, int]:
    """(height, width) the references are encoded at: ``ref_size``, else the video's."""
    return self.ref_size or (self.height, self.width)


GenerationRequest = make_dataclass(
    "GenerationRequest", [(f.name, f.type) for f in FIELDS], frozen=True, kw_only=True,
    namespace={"reference_size": property(_reference_size), "__module__": __name__,
               "__doc__": "A validated request (fields: ``engine.request.FIELDS``): images decoded to RGB uint8 "
                          "[H, W, 3], the mask to bool [H, W], numbers checked."},
)


# ---- validation ----------------------------------------------------------------------------------------------
def validate_request(limits: RequestLimits, **values) -> GenerationRequest:
    """Check every field against its rule and the model's ``limits``; raise ``RequestError`` on the first problem.

    Numbers and text first, then what depends on several fields (reference count, sequence length), then the
    images are decoded: a bad number is refused before any image is read.
    """
    _known(values)
    given = {f.name: _given(f, values.get(f.name)) for f in FIELDS}
    checked = {f.name: _check(f, given[f.name], limits) for f in FIELDS if f.kind not in IMAGE_KINDS}
    _check_sequence(limits, checked, list(given["references"]))
    _check_task(limits, given)
    _check_guidance(checked, given)
    _check_modes(limits, given, checked)
    checked.update({f.name: _check(f, given[f.name], limits) for f in FIELDS if f.kind in IMAGE_KINDS})
    _check_mask_size(checked["first_frame_mask"], checked["first_frame"])
    return GenerationRequest(**checked)


def make_request(defaults: Mapping[str, object], limits: RequestLimits, **values) -> GenerationRequest:
    """Fill the unset model-default fields from ``defaults`` (a checkpoint's generation defaults), and any other unset
    field ``defaults`` names (a checkpoint's ``mvgen_defaults.json``: Phantom-Wan's guidance recipe and reference
    fit), then validate."""
    _known(values)
    filled = {f.name: defaults[f.name] for f in FIELDS if values.get(f.name) is None
              and (f.default is MODEL_DEFAULT or f.name in defaults)}
    return validate_request(limits, **{**values, **filled})


def _known(values: Mapping[str, object]) -> None:
    unknown = sorted(set(values) - {f.name for f in FIELDS})
    if unknown:
        raise TypeError(f"unknown request field(s) {unknown}; the fields are {[f.name for f in FIELDS]}")


def _given(field: RequestField, value):
    if value is not None:
        return value
    if field.default is REQUIRED:
        raise RequestError(f"{field.name} is required ({field.help})")
    if field.default is MODEL_DEFAULT:
        raise RequestError(f"{field.name} is required here (make_request fills it from the model's defaults)")
    return None if field.default is I2V_ONLY else field.default


def _check(field: RequestField, value, limits: RequestLimits):
    if value is None and field.default in (None, I2V_ONLY):  # an optional field left unset
        return None
    return field.rule.check(field.name, value, limits)


def _check_sequence(limits: RequestLimits, checked: dict, references: list) -> None:
    if len(references) > limits.max_references:
        raise RequestError(
            f"got {len(references)} references, this model takes at most {limits.max_references} (max_references)"
        )
    frames, height, width = checked["num_frames"], checked["height"], checked["width"]
    tokens = token_count(limits, frames, height, width, len(references), checked["ref_size"] or (height, width))
    if tokens > limits.max_tokens:
        raise RequestError(
            f"{frames} frames at {height}x{width} with {len(references)} reference(s) make {tokens} tokens, "
            f"more than the limit of {limits.max_tokens}; lower frames, size, or references"
        )


def _check_task(limits: RequestLimits, given: dict) -> None:
    """What the checkpoint's kind decides: a first frame on I2V only, a second guidance scale on two experts."""
    if limits.first_frame and not limits.first_frame_optional and given["first_frame"] is None:
        raise RequestError("first_frame is required: this is an image-to-video model (give the video's first frame)")
    if not limits.first_frame and given["first_frame"] is not None:
        raise RequestError("this model is text/reference-to-video (Wan T2V): it takes no first_frame; give "
                           "references and a prompt")
    if given["first_frame_mask"] is not None and given["first_frame"] is None:
        raise RequestError("first_frame_mask needs a first_frame")
    if given["guidance_scale_2"] is not None and limits.experts < 2:
        raise RequestError("guidance_scale_2 applies to two-expert models (Wan2.2) only; this model has one")


def _check_guidance(checked: dict, given: dict) -> None:
    recipe = RECIPES[checked["guidance"]]
    if recipe.needs_references and not given["references"]:
        raise RequestError(f"guidance {recipe.name!r} guides by the references: give at least one reference, or "
                           f"guidance 'cfg'")


def _check_modes(limits: RequestLimits, given: dict, checked: dict) -> None:
    """The seed methods' inputs: only on a model of that mode, and as many as the frames / references."""
    refs, poses, frame_poses = len(given["references"]), len(given["reference_poses"]), len(given["frame_pose"])
    if (poses or frame_poses) and not limits.prototype:
        raise RequestError("frame_pose / reference_poses are for ProFashion prototype models "
                           "(ref_attention=prototype); this model is not one")
    if (poses or frame_poses) and not refs:
        raise RequestError("frame_pose / reference_poses steer how PPA aggregates the references: give references "
                           "too, or no poses")
    if limits.prototype and refs and not (poses and frame_poses):
        raise RequestError("a prototype (ProFashion PPA) model aggregates the references by pose: give frame_pose "
                           "(one pose image per frame) and reference_poses (one per reference)")
    if poses != refs and limits.prototype and refs:
        raise RequestError(f"got {poses} reference pose(s) for {refs} reference(s); give one per reference")
    if frame_poses and frame_poses != checked["num_frames"]:
        raise RequestError(f"got {frame_poses} frame pose image(s) for {checked['num_frames']} frames; give one per "
                           f"frame")
    if given["identity"] is not None and not limits.identity:
        raise RequestError("identity is for models with M2HVideo's identity adapter; this model has none")
    omegas = len(given["view_omega"])
    if omegas and not limits.multiview:
        raise RequestError("view_omega is for models with MVAnimate's multi-view attention (view_attention="
                           "multiview); this model has none")
    if omegas and omegas != refs:
        raise RequestError(f"got {omegas} view_omega value(s) for {refs} reference(s); give one per reference")


def _check_mask_size(mask: np.ndarray | None, frame: np.ndarray | None) -> None:
    if mask is not None and frame is not None and mask.shape != frame.shape[:2]:
        raise RequestError(
            f"first-frame mask is {mask.shape[1]}x{mask.shape[0]} but the first frame is "
            f"{frame.shape[1]}x{frame.shape[0]}; they must be the same size"
        )
