"""The denoiser's deployment interface, declared once.

The ONNX exporter (input/output names, dynamic axes), the TensorRT builder (optimization profiles) and the
Triton ``config.pbtxt`` writer (names, dims, data types) all read this module, so the three agree by
construction; it lives in ``engine`` because ``export`` and ``server`` both read it and neither may import
the other. Axis sizes are in *latent* units: ``frames`` latent frames (81 video frames -> 21), ``height``
and ``width`` latent rows/columns (480x832 -> 60x104), which the 1x2x2 patch needs to be even.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbones.families import family_of

DENOISER_MODEL_NAME = "mvgen_denoiser"
ONNX_FILE = "denoiser.onnx"
ONNX_DATA_FILE = "denoiser.onnx.data"
META_FILE = "export.json"
PLAN_META_SUFFIX = ".json"  # a TensorRT plan's metadata (dtype, profile, source) sits beside it: PLAN.json
OPSET = 18


@dataclass(frozen=True)
class Axis:
    """A dynamic axis with its default TensorRT profile (min/opt/max) and the multiple its sizes must be."""

    name: str
    min: int
    opt: int
    max: int
    multiple: int = 1

    def check(self, lo: int, opt: int, hi: int) -> None:
        if not lo <= opt <= hi:
            raise ValueError(f"profile for axis {self.name!r} needs min <= opt <= max, got {lo}/{opt}/{hi}")
        bad = [v for v in (lo, opt, hi) if v % self.multiple]
        if bad:
            raise ValueError(f"profile sizes of axis {self.name!r} must be multiples of {self.multiple}, got {bad}")


# Defaults: Wan2.1-I2V 480P, 81 frames, cond+uncond batched for CFG, up to 3 references.
AXES: dict[str, Axis] = {a.name: a for a in (
    Axis("batch", 1, 2, 2),
    Axis("frames", 1, 21, 21),
    Axis("height", 16, 60, 104, multiple=2),
    Axis("width", 16, 104, 104, multiple=2),
    Axis("refs", 0, 3, 3),
    Axis("ref_height", 16, 60, 104, multiple=2),
    Axis("ref_width", 16, 104, 104, multiple=2),
    Axis("identity_len", 1, 257, 257),  # CLIP tokens of an identity image (M2HVideo models only)
)}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: name, dims (axis names or fixed sizes) and dtype role.

    ``dtype`` is ``"model"`` (the export dtype: fp32/fp16/bf16) or ``"float32"`` (always float32).
    """

    name: str
    dims: tuple[str | int, ...]
    dtype: str = "model"
    doc: str = ""

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)

    def torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self.dtype == "float32" else model_dtype


def input_specs(text_dim: int, image_dim: int | None, text_len: int = 512, image_len: int = 257,
                condition_channels: int = 20, family: str = "wan", pooled_dim: int | None = None,
                latent_channels: int = 16) -> list[TensorSpec]:
    """The denoiser's inputs, in the order of its ``forward``: T2V checkpoints (``condition_channels`` 0) have no
    ``condition``, checkpoints without CLIP (``image_dim`` None: T2V, Wan2.2, MMDiT) no ``image_context``; an MMDiT
    (``family`` "mmdit") takes its text encoder's token mask and pooled CLIP text (``pooled_dim`` wide) too."""
    described = family_of(family)
    condition_doc, text_doc = described.condition_doc, described.text_doc
    specs = [
        TensorSpec("latents", ("batch", latent_channels, "frames", "height", "width"), doc="noisy video latents"),
        TensorSpec("condition", ("batch", condition_channels, "frames", "height", "width"),
                   doc=condition_doc) if condition_channels else None,
        TensorSpec("timestep", ("batch",), "float32", doc="flow-matching timestep (0..1000)"),
        TensorSpec("text", ("batch", text_len, text_dim), doc=text_doc),
        TensorSpec("image_context", ("batch", image_len, image_dim), doc="CLIP image states") if image_dim else None,
        TensorSpec("ref_latents", ("batch", "refs", latent_channels, "ref_height", "ref_width"),
                   doc="clean reference latents"),
    ]
    text_specs = {"text_mask": TensorSpec("text_mask", ("batch", text_len), "float32",
                                          doc="1 = a real text token, 0 = padding"),
                  "pooled_text": TensorSpec("pooled_text", ("batch", pooled_dim), doc="CLIP text pooled output")}
    specs += [text_specs[name] for name in described.text_outputs if name != "text"]
    return [spec for spec in specs if spec is not None]


# what a family's text encoder returns for N prompts, each entry a denoiser input of the same name ([N, ...]): Wan's
# umT5 states; an MMDiT's Llama states, their token mask and the pooled CLIP text (HunyuanVideo's encode_prompt)
def text_outputs(config) -> tuple[str, ...]:
    """What the text encoder of a denoiser config's family returns (an ``MvgenConfig`` or its ``to_dict()``)."""
    return family_of(config).text_outputs


def mode_specs(values: dict) -> list[TensorSpec]:
    """The seed methods' inputs of a config's modes (``engine.modes``). A request without one sends it empty
    (0 references / identity tokens), so every call of a model has the same inputs and batches together."""
    pose = values.get("pose_channels", 3)
    specs = []
    if values.get("ref_attention") == "prototype":
        specs += [TensorSpec("frame_pose", ("batch", "frames", pose, "height", "width"),
                             doc="ProFashion: a pose image per latent frame, on the latent grid"),
                  TensorSpec("ref_pose", ("batch", "refs", pose, "ref_height", "ref_width"),
                             doc="ProFashion: each reference's pose image, on its latent grid")]
    if values.get("identity"):
        specs.append(TensorSpec("identity_context", ("batch", "identity_len", values["image_dim"]),
                                doc="M2HVideo: CLIP states of the identity image"))
    if values.get("view_attention") == "multiview":
        specs.append(TensorSpec("view_omega", ("batch", "refs"), "float32", doc="MVAnimate Eq. 2: per-view omega"))
    return specs


def config_specs(config) -> list[TensorSpec]:
    """``input_specs`` of a denoiser config (an ``MvgenConfig`` or its ``to_dict()``, as export metadata holds it),
    then its modes' inputs."""
    values = config if isinstance(config, dict) else config.to_dict()
    return input_specs(values["text_dim"], values["image_dim"], values["text_len"],
                       condition_channels=family_of(values).condition_channels(values["in_channels"],
                                                                               values["out_channels"]),
                       family=values.get("family", "wan"),
                       pooled_dim=values.get("pooled_projection_dim"),
                       latent_channels=values["out_channels"]) + mode_specs(values)


def output_spec(config) -> TensorSpec:
    """The velocity of a denoiser config (an ``MvgenConfig`` or its ``to_dict()``): its latent channels."""
    values = config if isinstance(config, dict) else config.to_dict()
    return TensorSpec("velocity", ("batch", values["out_channels"], "frames", "height", "width"),
                      doc="flow-matching velocity")


# the denoiser inputs that change at every step; every other input is step-invariant and, under the config's
# ``inputs_once``, reaches the denoiser once per request and expert (engine.generation.predict_velocity)
STEP_INPUTS = ("latents", "timestep")


def step_only(inputs: dict) -> bool:
    """Does a call carry only its ``STEP_INPUTS`` (a later step of a request whose denoiser keeps the rest)? Every
    full call carries ``text``, which every family takes."""
    return inputs.get("text") is None


OUTPUT = output_spec({"out_channels": 16})  # Wan2.1/2.2-A14B's and HunyuanVideo's 16 latent channels

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRITON_DTYPES = {torch.float32: "TYPE_FP32", torch.float16: "TYPE_FP16", torch.bfloat16: "TYPE_BF16"}


def dynamic_axes(specs: list[TensorSpec]) -> dict[str, dict[int, str]]:
    """``{tensor: {dim index: axis name}}`` in the form of ``torch.onnx.export(dynamic_axes=...)``."""
    return {s.name: {i: d for i, d in enumerate(s.dims) if isinstance(d, str)} for s in specs}


@dataclass(frozen=True)
class Profile:
    """min/opt/max size per dynamic axis; anything not given takes the default of ``AXES``."""

    ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.ranges) - set(AXES)
        if unknown:
            raise ValueError(f"unknown profile axis {sorted(unknown)}; axes are {list(AXES)}")
        for name, (lo, opt, hi) in self.ranges.items():
            AXES[name].check(lo, opt, hi)

    def range(self, axis: str) -> tuple[int, int, int]:
        a = AXES[axis]
        return self.ranges.get(axis, (a.min, a.opt, a.max))

    def sizes(self, which: str) -> dict[str, int]:
        """Axis sizes of the ``"min"``, ``"opt"`` or ``"max"`` corner."""
        index = ("min", "opt", "max").index(which)
        return {axis: self.range(axis)[index] for axis in AXES}

    def shapes(self, specs: list[TensorSpec]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """``{input: (min shape, opt shape, max shape)}`` for a TensorRT optimization profile."""
        corners = [self.sizes(w) for w in ("min", "opt", "max")]
        return {s.name: tuple(s.shape(c) for c in corners) for s in specs}

    def to_dict(self) -> dict[str, list[int]]:
        return {axis: list(self.range(axis)) for axis in AXES}

    @classmethod
    def parse(cls, spec: str | None) -> "Profile":
        """``"batch=1:2:2,frames=1:21:21,refs=0:3:3"`` (min:opt:max; a single number fixes the axis)."""
        ranges = {}
        for item in filter(None, (spec or "").replace(" ", "").split(",")):
            name, sep, values = item.partition("=")
            try:
                numbers = [int(v) for v in values.split(":")]
            except ValueError:
                numbers = []
            if not sep or len(numbers) not in (1, 3):
                raise ValueError(
                    f"bad profile entry {item!r}: expected AXIS=MIN:OPT:MAX or AXIS=SIZE, axes {list(AXES)}")
            ranges[name] = tuple(numbers * 3 if len(numbers) == 1 else numbers)
        return cls(ranges)


def denoiser_model_name(expert: int = 0) -> str:
    """The served denoiser of an expert: ``mvgen_denoiser``, then (Wan2.2's low-noise expert) ``mvgen_denoiser_2``."""
    return DENOISER_MODEL_NAME if expert == 0 else f"{DENOISER_MODEL_NAME}_{expert + 1}"


def plan_meta_path(plan: str | Path) -> Path:
    return Path(str(plan) + PLAN_META_SUFFIX)


def read_plan_meta(plan: str | Path) -> dict:
    """The metadata ``mvgen export tensorrt`` writes beside a plan (the server's repository writer reads it)."""
    path = plan_meta_path(plan)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: was {plan} built by `mvgen export tensorrt`?")
    return json.loads(path.read_text())
