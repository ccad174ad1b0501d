"""FP8 in the exported graph: QuantizeLinear/DequantizeLinear pairs (opset 19) placed as TensorRT's FP8 recipe
expects, around the FP8 linears of a ``--quantize fp8`` denoiser (``engine.runtime.fp8``).

The pattern is TensorRT-ModelOpt's ONNX FP8 quantisation (``modelopt.onnx.quantization``, ``quantize_mode="fp8"``
with ``dq_only``), which TensorRT fuses into FP8 GEMMs:

- each weight is an FP8 initializer (the PyTorch model's own bytes) read through ``DequantizeLinear`` with its
  per-output-channel scales (``axis=0`` on our [out, in] layout, followed by the Transpose of ``F.linear``; ModelOpt
  stores the transposed [in, out] initializer with ``axis=1``);
- each GEMM's activation input passes a QuantizeLinear/DequantizeLinear pair with one per-tensor scale, calibrated
  as ModelOpt's ``max`` calibrator does: the largest |activation| seen over the calibration inputs / 448.
  TensorRT's FP8 GEMMs take a static per-tensor activation scale; the per-token dynamic scales of the PyTorch GEMM
  path have no ONNX/TensorRT counterpart, so the graph is the model's ``static`` path, which is its oracle.

Why not ModelOpt itself: ``nvidia-modelopt[onnx]`` 0.47 installs and its ONNX FP8 quantisation runs on this CPU
(checked in a separate virtual environment), but it requires torch 2.14 (the project pins 2.13 for CPU machines),
it quantises the float graph's weights again (from fp16 copies by default: a second rounding of weights that are
already FP8), and it converts the graph to fp16 unless told otherwise. Placing the same pairs here keeps the
graph's weights bit-identical to the PyTorch FP8 model's.

Calibration inputs: ``calibrated`` takes the inputs to calibrate on; the exporter passes its sample inputs (random,
seeded), or with ``--fp8-calibration generation`` the denoiser inputs of a short real generation of the checkpoint
(``export.calibration_inputs``: on the tiny model its scales are 0.6x to 2.1x the random inputs'), and ``export.json``
records which (``fp8.calibration``) with every scale. A graph made for an engine that already exists (a TensorRT
refit: ``export.tensorrt_build.refit_onnx``) is not calibrated again: it takes the scales its ``export.json``
recorded (``recorded``), so the refit's Q/DQ scales are the engine's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import onnx
import torch

from engine.runtime.fp8 import FP8_MAX, FP8_MODULES, quantized_modules

FP8_OPSET = 19  # FP8 QuantizeLinear/DequantizeLinear (float8e4m3fn, per-axis scales)


@dataclass
class Fp8Export:
    """What an export of this model needs for FP8: the opset, the exporter's translations of the FP8 ops and what
    ``export.json`` records (None for a model without FP8 linears)."""

    opset: int | None = None
    translations: dict = field(default_factory=dict)
    meta: dict | None = None


def _dequantize(q, scale):
    """``mvgen::fp8_dequantize`` -> DequantizeLinear(q [out, in] float8e4m3fn, scale [out], axis=0)."""
    from onnxscript import opset19 as op

    return op.DequantizeLinear(q, scale, axis=0)


def _fake_quantize(x, scale):
    """``mvgen::fp8_fake_quantize`` -> QuantizeLinear/DequantizeLinear with one per-tensor scale (in x's type)."""
    from onnxscript import opset19 as op

    zero = op.Constant(value=onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT8E4M3FN, [], [0.0]))
    scale = op.CastLike(scale, x)
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale)


def translations() -> dict:
    return {torch.ops.mvgen.fp8_dequantize.default: _dequantize,
            torch.ops.mvgen.fp8_fake_quantize.default: _fake_quantize}


def calibrate(model: torch.nn.Module, run, feeds: list[dict]) -> dict[str, float]:
    """Each FP8 linear's per-tensor activation scale: max |input| over ``run(feed)`` for every feed, / 448 (an
    all-zero input gets 1)."""
    names = {id(m): name for name, m in model.named_modules()}  # a shared module under its first name
    amax: dict[str, float] = {}

    def record(module, args):
        name = names[id(module)]
        amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().max().item())

    hooks = [m.register_forward_pre_hook(record) for m in quantized_modules(model)]
    try:
        with torch.no_grad():
            for feed in feeds:
                run(feed)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (value / FP8_MAX if value > 0 else 1.0) for name, value in sorted(amax.items())}


@contextlib.contextmanager
def calibrated(model: torch.nn.Module, run, feeds: list[dict], source: str, recorded: dict | None = None):
    """``model`` on the static path for the duration (its FP8 linears fake-quantise their inputs with scales
    calibrated on ``feeds``; ``source`` says what the feeds are); yields the ``Fp8Export`` of the graph traced inside.
    ``recorded``: an earlier export's ``fp8`` record (its ``export.json``), whose activation scales are taken as they
    are instead (nothing runs). A linear the feeds never reach is in no graph traced with them (a reference block's
    image K/V when the cross-attention K/V are the video block's) and keeps its path. A model without FP8 linears
    yields an empty one and is left alone."""
    if not quantized_modules(model):
        if recorded is not None:
            raise ValueError("activation scales were recorded for FP8 linears, but this model has none (its export "
                             "was --quantize fp8: load it with the same quantize)")
        yield Fp8Export()
        return
    if recorded is None:
        scales = calibrate(model, run, feeds)
    else:
        scales, source = recorded["activation_scales"], recorded["calibration"]
    with static_scales(model, scales):
        yield Fp8Export(FP8_OPSET, translations(), {
            "weights": "float8_e4m3fn, per-output-channel scales (DequantizeLinear axis 0)",
            "activations": "QuantizeLinear/DequantizeLinear, per-tensor scales, max calibration",
            "calibration": source, "activation_scales": scales})


@contextlib.contextmanager
def static_scales(model: torch.nn.Module, scales: dict[str, float]):
    """``model`` on the static path with given activation scales (an exported graph's ``fp8.activation_scales``):
    the PyTorch oracle of that graph. A name that is no FP8 linear of ``model`` is refused."""
    by_name = dict(model.named_modules())
    unknown = sorted(name for name in scales if not isinstance(by_name.get(name), FP8_MODULES))
    if unknown:
        raise ValueError(f"activation scales for modules that are no FP8 linear of this model: {unknown[:6]}")
    saved = [(m, m.path, m.input_scale) for m in quantized_modules(model)]
    try:
        for name, scale in scales.items():
            by_name[name].path, by_name[name].input_scale = "static", torch.tensor(scale, dtype=torch.float32)
        yield model
    finally:
        for module, path, input_scale in saved:
            module.path, module.input_scale = path, input_scale
