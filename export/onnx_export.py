"""Denoiser (LoRA merged at load) -> ONNX with dynamic batch, frames, height, width and references.

The graph's reference stream is always merged: plain weights named ``ref_blocks.N.*``, no LoRA ops, so a TensorRT
refit swaps whole merged reference weights. ``load_for_export`` loads with ``ref_weights="merged"``;
``export_denoiser`` given a model whose reference stream shares the video stream's weights traces a merged copy of
the reference blocks (``engine.adapters.reference_weights.merged_reference_stream``).

Exporter choice: ``torch.onnx.export(dynamo=True)``. It keeps every size symbolic (positions and RoPE angles
are computed in-graph from ``Shape``), so R = 0 and R > 0 are the same graph with a dynamic ``refs`` axis.
The TorchScript exporter (``dynamo=False``) does not work for this model: it has no ``aten::rms_norm`` at
opset 18, and tracing freezes the sizes that feed ``arange``. Two torchlib translations are replaced here,
both wrong for this graph as shipped with onnxscript 0.7:
  - ``operator.floordiv`` on symbolic ints is emitted as a truncating ``Div``; RD-RoPE centres a reference
    grid with ``(h - hr) // 2``, negative when a reference is larger than the video, so floor is restored;
  - ``aten.repeat_interleave.self_int`` with a symbolic repeat count produces an invalid ``Expand`` shape
    (the per-view logit scale of each reference token); it is re-expressed as Unsqueeze/Expand/Reshape.
Sample sizes avoid 0 and 1, which torch.export would specialise.
"""
from __future__ import annotations

import contextlib
import json
import logging
import operator
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from engine import denoiser_io
from engine.backbones.families import family_of
from engine.checkpoint import Checkpoint
from engine.runtime.denoiser import load_expert
from engine.adapters.reference_weights import merged_reference_stream

from .calibration_inputs import FP8_CALIBRATIONS
from .fp8_onnx import calibrated
from .plugin import plugin_attention

log = logging.getLogger("mvgen.export")

ATTENTION_MODES = ("native", "plugin")
# sizes of the example inputs traced at export time (tests check other sizes)
# what a --quantize fp8 graph's activation scales are calibrated on (export.fp8_onnx)
CALIBRATION = "the exporter's sample inputs (seeded random, EXPORT_SIZES): no real calibration data"
EXPORT_SIZES = dict(batch=2, frames=3, height=6, width=8, refs=2, ref_height=4, ref_width=6, identity_len=5)


class DenoiserGraph(nn.Module):
    """The denoiser with the graph's inputs (``denoiser_io.config_specs``: T2V has no ``condition``, checkpoints
    without CLIP no ``image_context``), passed by name; references always go through the joint path."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, latents, timestep, text, ref_latents, condition=None, image_context=None, frame_pose=None,
                ref_pose=None, identity_context=None, view_omega=None, text_mask=None, pooled_text=None):
        return self.denoiser(latents, condition, timestep, text, image_context, ref_latents=ref_latents,
                             frame_pose=frame_pose, ref_pose=ref_pose, identity_context=identity_context,
                             view_omega=view_omega, text_mask=text_mask, pooled_text=pooled_text)


def needs_references(config) -> bool:
    """Whether the traced graph of this config is valid with references only (its modes branch on R = 0)."""
    return config.ref_attention == "prototype" or config.view_attention == "multiview"


def graph_specs(config) -> list[denoiser_io.TensorSpec]:
    return denoiser_io.config_specs(config)


# the first latent frame of a TI2V condition's rows, in turn: known whole (image-to-video), unknown (text-to-video: the
# zero condition a graph, which has no optional inputs, takes in place of none), known in part (an inpainting mask)
TI2V_ROWS = ("first_frame", "none", "inpainting")


def ti2v_condition(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A TI2V condition [B, 1 + C, F, H, W] as the VAE encodes one (``encode_condition``): the known mask on latent
    frame 0, that frame's latent where any cell is known, zeros elsewhere; rows cycle through ``TI2V_ROWS``."""
    condition = torch.zeros(shape)
    for row in range(shape[0]):
        kind = TI2V_ROWS[row % len(TI2V_ROWS)]
        if kind == "none":
            continue
        known = torch.ones(shape[-2:]) if kind == "first_frame" else (torch.rand(shape[-2:], generator=generator) < 0.5)
        condition[row, 0, 0] = known
        condition[row, 1:, 0] = torch.randn(shape[1] - 1, *shape[-2:], generator=generator)
    return condition


def sample_inputs(specs, sizes: dict[str, int], dtype: torch.dtype, generator: torch.Generator,
                  config=None) -> dict:
    """Random inputs for ``specs`` at axis ``sizes`` (timesteps in [0, 1000); an MMDiT's text mask: each row's
    prompt a random prefix of at least one token, the rest padding; the condition of a TI2V ``config``: what the
    served loop sends, ``ti2v_condition``, its mask 0 or 1 as the per-token timesteps derived from it expect)."""
    out = {}
    for spec in specs:
        shape = spec.shape(sizes)
        if spec.name == "timestep":
            out[spec.name] = torch.rand(shape, generator=generator) * 1000
        elif spec.name == "condition" and config is not None and config.condition_optional:
            out[spec.name] = ti2v_condition(shape, generator).to(spec.torch_dtype(dtype))
        elif spec.name == "text_mask":
            lengths = torch.randint(1, shape[1] + 1, (shape[0], 1), generator=generator)
            out[spec.name] = (torch.arange(shape[1])[None] < lengths).to(spec.torch_dtype(dtype))
        else:
            out[spec.name] = torch.randn(shape, generator=generator).to(spec.torch_dtype(dtype))
    return out


def export_dynamic_shapes(specs, minimums: dict[str, int] | None = None) -> dict[str, dict[int, object]]:
    """torch.export ``Dim``s per input; an axis with a multiple m is ``m * Dim(axis_div_m)``; ``minimums``
    raise an axis' lower bound (a prototype graph's references)."""
    from torch.export import Dim

    dims = {}
    for name, axis in denoiser_io.AXES.items():
        if axis.multiple > 1:
            dims[name] = axis.multiple * Dim(f"{name}_div{axis.multiple}", min=1)
        else:
            dims[name] = Dim(name, min=(minimums or {}).get(name, axis.min))
    return {s.name: {i: dims[d] for i, d in enumerate(s.dims) if isinstance(d, str)} for s in specs}


def _floordiv(a, b):
    """Python floor division of int64 scalars (ONNX ``Div`` truncates towards zero)."""
    from onnxscript import opset18 as op

    trunc = op.Div(a, b)
    inexact = op.Not(op.Equal(op.Mul(trunc, b), a))
    signs_differ = op.Xor(op.Less(a, op.CastLike(0, a)), op.Less(b, op.CastLike(0, b)))
    return op.Sub(trunc, op.CastLike(op.And(inexact, signs_differ), trunc))


def _repeat_interleave(self, repeats, dim=None, output_size=None):
    """``x.repeat_interleave(n, dim)`` with a (symbolic) int repeat count: each slice along ``dim`` (the flattened
    tensor when None) repeated n times, as Unsqueeze/Expand/Reshape over the input's own shape. Our per-view logit
    scales repeat a 1-D tensor; diffusers' ``Attention.prepare_attention_mask`` (HunyuanVideo's token refiner)
    repeats a mask along its batch or head dim."""
    from onnxscript import opset18 as op

    if dim is None:
        self, dim = op.Reshape(self, op.Constant(value_ints=[-1])), 0
    if dim < 0:
        dim += len(self.shape)
    count = op.Constant(value_ints=[repeats]) if isinstance(repeats, int) else op.Reshape(
        op.Cast(repeats, to=onnx.TensorProto.INT64), op.Constant(value_ints=[1]))
    shape = op.Shape(self)
    before = op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[dim]))
    size = op.Slice(shape, op.Constant(value_ints=[dim]), op.Constant(value_ints=[dim + 1]))
    after = op.Slice(shape, op.Constant(value_ints=[dim + 1]), op.Constant(value_ints=[2**62]))
    tiled = op.Expand(op.Unsqueeze(self, op.Constant(value_ints=[dim + 1])),
                      op.Concat(before, size, count, after, axis=0))
    return op.Reshape(tiled, op.Concat(before, op.Mul(size, count), after, axis=0))


def translation_table() -> dict:
    return {operator.floordiv: _floordiv, torch.ops.aten.repeat_interleave.self_int: _repeat_interleave}


def _name_axes(path: Path, specs) -> None:
    """Give the graph's dynamic input/output dims the axis names of ``names`` (weights stay external)."""
    model = onnx.load(str(path), load_external_data=False)
    by_name = {s.name: s for s in specs}
    for value in [*model.graph.input, *model.graph.output]:
        spec = by_name[value.name]
        for dim, axis in zip(value.type.tensor_type.shape.dim, spec.dims):
            if isinstance(axis, str):
                dim.ClearField("dim_value")
                dim.dim_param = axis
    onnx.save(model, str(path))


def export_denoiser(denoiser, out_dir: str | Path, attention: str = "native",
                    profile: denoiser_io.Profile | None = None, source: dict | None = None,
                    fp8_record: dict | None = None, calibration: tuple[list[dict], str] | None = None,
                    optimize: bool = True) -> Path:
    """Write ``denoiser.onnx`` (+ ``denoiser.onnx.data``) and ``export.json`` into ``out_dir``. A ``--quantize fp8``
    graph's activation scales: ``fp8_record``'s (an earlier export's ``fp8`` record: a refit), else calibrated on
    ``calibration`` (feeds by graph input name, what they are), else on the sample inputs traced
    (``export.fp8_onnx``).

    ``optimize`` runs onnxscript's graph optimiser after the export (constant folding, pattern rewrites), as
    ``mvgen export`` always does; it takes about a third of a small model's export time and leaves the graph's
    arithmetic unchanged, so tests that compare a graph's numbers with PyTorch may skip it."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    cfg = denoiser.config
    minimums = {}
    if not family_of(cfg).plugin_attention and attention == "plugin":
        raise ValueError("an MMDiT exports with --attention native (the plugin node has no text stream and no key "
                         "lengths: the text padding mask)")
    if cfg.ref_attention == "prototype" and attention == "plugin":
        raise ValueError("ref_attention='prototype' exports with --attention native (the plugin node has no "
                         "prototype mask; TensorRT fuses the native graph's masked attention itself)")
    if needs_references(cfg):
        # the traced graph is the mode's reference path (the eager model at R = 0 is its base model: serve R = 0
        # requests of such a model with the python denoiser), so its refs axis starts at 1
        minimums["refs"] = 1
        profile = profile or denoiser_io.Profile({"refs": (1, 3, 3)})
        if profile.range("refs")[0] < 1:
            raise ValueError("a prototype (PPA) or multiview (MVAnimate) graph needs references: its profile's "
                             "refs axis must start at 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / denoiser_io.ONNX_FILE
    dtype = denoiser.proj_out.weight.dtype
    specs = graph_specs(cfg)
    output = denoiser_io.output_spec(cfg)
    example = sample_inputs(specs, EXPORT_SIZES, dtype, torch.Generator().manual_seed(0), cfg)
    denoiser = denoiser.eval().requires_grad_(False)

    feeds, fed = calibration or ([example], CALIBRATION)
    with merged_reference_stream(denoiser), torch.no_grad(), warnings.catch_warnings(), \
            plugin_attention(denoiser) if attention == "plugin" else contextlib.nullcontext(), \
            calibrated(denoiser, lambda feed: DenoiserGraph(denoiser)(**feed), feeds, fed, fp8_record) as fp8:
        # torch.onnx notes that derived axes (2*height_div2) keep their symbolic name; _name_axes renames them
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        program = torch.onnx.export(
            DenoiserGraph(denoiser).eval(), (), kwargs=example, dynamo=True,
            dynamic_shapes=export_dynamic_shapes(specs, minimums), input_names=[s.name for s in specs],
            output_names=[denoiser_io.OUTPUT.name], opset_version=fp8.opset or denoiser_io.OPSET,
            custom_translation_table={**translation_table(), **fp8.translations}, verbose=False, optimize=optimize,
        )
        for stale in (path, out_dir / denoiser_io.ONNX_DATA_FILE):
            stale.unlink(missing_ok=True)
        program.save(str(path), external_data=True)
    _name_axes(path, [*specs, output])
    meta = {
        "model_name": denoiser_io.DENOISER_MODEL_NAME,
        "onnx": denoiser_io.ONNX_FILE,
        "attention": attention,
        "dtype": {v: k for k, v in denoiser_io.DTYPES.items()}[dtype],
        "opset": fp8.opset or denoiser_io.OPSET,
        "fp8": fp8.meta,  # a --quantize fp8 graph's Q/DQ (export.fp8_onnx); None otherwise
        "profile": (profile or denoiser_io.Profile()).to_dict(),
        "inputs": [{"name": s.name, "dims": list(s.dims), "dtype": s.dtype} for s in specs],
        "output": {"name": output.name, "dims": list(output.dims)},
        "config": cfg.replace(ref_weights="merged").to_dict(),  # the graph's reference stream is merged
        "source": source or {},
    }
    (out_dir / denoiser_io.META_FILE).write_text(json.dumps(meta, indent=2))
    return path


def export_onnx(model: str | Path, out_dir: str | Path, adapter: str | Path | None = None, dtype: str = "fp32",
                attention: str = "native", profile: denoiser_io.Profile | None = None, lora_scale: float | None = None,
                cache_root: str | Path | None = None, expert: int = 0, sources: dict | None = None,
                fp8_record: dict | None = None, fp8_calibration: str = "sample", **config_overrides) -> Path:
    """Load one expert of ``model`` with its base LoRAs merged into the video stream and ``adapter`` into the
    reference stream, export it; returns the .onnx path.

    ``model`` ``"tiny"`` (or another embedded model) is built under ``cache_root`` with its bundled adapters;
    ``sources`` are ``Checkpoint.load``'s weight sources (``loras``, ``transformer_file``, ``adapter_2``, ...);
    ``expert`` 1 is Wan2.2's low-noise ``transformer_2``; ``fp8_record``: ``export_denoiser``'s. ``fp8_calibration``
    (``FP8_CALIBRATIONS``): what a ``--quantize fp8`` graph's activation scales are calibrated on, the sample inputs or
    the denoiser inputs of a short generation of this checkpoint (``export.calibration_inputs``; the generation runs
    the adapter at its own scale, so it is refused with ``lora_scale``)."""
    if dtype not in denoiser_io.DTYPES:
        raise ValueError(f"dtype must be one of {sorted(denoiser_io.DTYPES)}, got {dtype!r}")
    if fp8_calibration not in FP8_CALIBRATIONS:
        raise ValueError(f"fp8_calibration must be one of {', '.join(FP8_CALIBRATIONS)}, got {fp8_calibration!r}")
    checkpoint = checkpoint_for_export(model, adapter, dtype, cache_root, expert, sources, config_overrides)
    calibration = None
    if fp8_calibration == "generation" and checkpoint.config.quantize != "none" and fp8_record is None:
        from .calibration_inputs import generation_feeds

        if lora_scale is not None:
            raise ValueError("fp8_calibration 'generation' runs the adapter at its own scale: it cannot calibrate a "
                             "graph exported with lora_scale")
        calibration = generation_feeds(checkpoint, expert, [s.name for s in graph_specs(checkpoint.config)])
    denoiser = load_expert(checkpoint, expert, lora_scale)
    spec = checkpoint.experts[expert]
    source = {"model": str(model), "adapter": str(spec.adapter) if spec.adapter else None, "lora_scale": lora_scale,
              "expert": expert, "sources": checkpoint.sources()}
    return export_denoiser(denoiser, out_dir, attention=attention, profile=profile, source=source,
                           fp8_record=fp8_record, calibration=calibration)


def load_for_export(model, adapter, dtype: str, lora_scale, cache_root, expert: int, sources: dict | None,
                    config_overrides: dict):
    """(the expert's denoiser on the reference attention path, its ``Checkpoint``: ``checkpoint_for_export``)."""
    checkpoint = checkpoint_for_export(model, adapter, dtype, cache_root, expert, sources, config_overrides)
    return load_expert(checkpoint, expert, lora_scale), checkpoint


def checkpoint_for_export(model, adapter, dtype: str, cache_root, expert: int, sources: dict | None,
                          config_overrides: dict) -> Checkpoint:
    """The ``Checkpoint`` an export loads its expert from, on the reference attention path. The reference stream is
    merged (``ref_weights="merged"``): the graph holds its weights whole, and a refit replaces them."""
    if config_overrides.get("ref_weights", "merged") != "merged":
        raise ValueError(f"the export merges the reference stream into the graph's weights (ref_weights='merged'), "
                         f"got ref_weights={config_overrides['ref_weights']!r}")
    if config_overrides.get("attention_precision", "bf16") != "bf16":
        # the graph's attention is the 16-bit path the TensorRT plugin and ONNX runtimes have; export.json records it
        log.warning("the exported graph's attention is 16-bit (attention_precision=%r runs in PyTorch only: the "
                    "TensorRT plugin has no 8-bit form)", config_overrides["attention_precision"])
    checkpoint = Checkpoint.load(model, adapter, **(sources or {}), dtype=denoiser_io.DTYPES[dtype],
                                 cache_root=cache_root, attention_backend="reference",
                                 **{**config_overrides, "ref_weights": "merged", "attention_precision": "bf16"})
    if not 0 <= expert < len(checkpoint.experts):
        raise ValueError(f"expert must be 0..{len(checkpoint.experts) - 1} for {checkpoint.path}, got {expert}")
    return checkpoint


def read_meta(onnx_dir: str | Path) -> dict:
    meta = Path(onnx_dir) / denoiser_io.META_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: is {onnx_dir} a directory written by `mvgen export onnx`?")
    return json.loads(meta.read_text())
