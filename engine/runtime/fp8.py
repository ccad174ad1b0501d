"""8-bit weights (``MvgenConfig.quantize``): the denoiser's block linears held as ``float8_e4m3fn`` with one float32
scale per output channel, and the two ways of computing with them.

What is quantised: every ``nn.Linear`` inside the block lists (``model.REFERENCE_BLOCKS``: Wan's ``blocks`` /
``ref_blocks``, the MMDiT's dual- and single-stream lists and their reference copies): the self- and
cross-attention projections and the FFN, 98.5% of Wan2.1-I2V-14B's parameters. Kept in the compute dtype: everything
outside the blocks (patch and condition embeddings, the output head), and inside them the modulation (Wan's tables are
no Linear; the MMDiT's AdaLN linears live under ``norm*``), the norms, the reference stream's LoRA pairs
(``lora_A``/``lora_B``) and a seed mode's modules (M2HVideo's ``identity``): ``KEPT_IN_COMPUTE_DTYPE``.

Scales: absmax per output channel, ``s = max|W[o, :]| / 448`` (448: e4m3fn's largest finite value), so the largest
weight of each row lands on 448 exactly and no row saturates; an all-zero row gets the smallest normal float32
scale. The rule is LightX2V's and TensorRT-ModelOpt's per-channel FP8 (a per-output-channel scale costs 4 bytes
per row: 0.03% of a 5120-wide Wan weight).

Compute (``COMPUTE_PATHS``, one per module, the log line and ``mvgen bench`` say which):
- ``gemm``: FP8 GEMMs, ``torch._scaled_mm`` with row-wise scales: each token's activations quantised with their
  own absmax scale (dynamic, per token), the weight's per-channel scales on the other side, float32 accumulation.
  Needs FP8 tensor cores (sm_89, sm_90+) to be fast; runs on the CPU in torch 2.13 too (slow: for tests).
- ``weight_only``: each layer's weight dequantised on the fly into the compute dtype, then a plain ``F.linear``
  (through ``BatchInvariantOps`` under ``deterministic``): the weight memory halves on every device.
- ``static``: activations fake-quantised with one calibrated per-tensor scale (``input_scale``), weights
  dequantised: what an exported FP8 graph computes (``export.fp8_onnx``), kept here as that graph's oracle.
``quantize="fp8"`` picks ``gemm`` where the call's device has FP8 tensor cores and ``weight_only`` elsewhere, per
call (an offloaded model is loaded on the host and runs on the GPU); ``fp8_gemm`` / ``fp8_weight_only`` force one.

The reference stream: when it shares the video stream's weights (``engine.adapters.reference_weights``), each of its
linears holds the same FP8 weight and scale tensors as the video block's (one storage), and a ``LowRankLinear``
(its LoRA on a shared weight, unmerged) becomes an ``Fp8LowRankLinear``: FP8 base, compute-dtype pair.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.lora import LowRankDelta
from ..adapters.reference_weights import LowRankLinear, reference_pairs
from ..config import QUANTIZE_MODES

log = logging.getLogger("mvgen.loading")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# a zero row's scale (and the floor of a token's activation scale): any positive value gives exact zeros
_TINY = float(torch.finfo(torch.float32).tiny)
COMPUTE_PATHS = ("auto", "gemm", "weight_only", "static")
# quantize mode -> compute path of its modules (QUANTIZE_MODES is declared with the config)
_PATH_OF_MODE = {"fp8": "auto", "fp8_gemm": "gemm", "fp8_weight_only": "weight_only"}
assert set(_PATH_OF_MODE) == set(QUANTIZE_MODES) - {"none"}
# parts of a block-relative module name that stay in the compute dtype (module docstring)
KEPT_IN_COMPUTE_DTYPE = ("norm", "lora_", "identity")
FP8_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper+ have FP8 tensor cores


# ---- the numbers ------------------------------------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [out, in] float8_e4m3fn, scale [out] float32) of a weight [out, in]: absmax per output channel."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=_TINY)
    return quantize_with_scale(w, scale), scale


def quantize_with_scale(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] / ``scale`` [out], saturated to +-448, rounded to nearest-even e4m3fn."""
    return (weight.float() / scale.float()[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` per output channel (``scale`` [out] along q's first dimension, whatever q's rank), computed in
    float32 and cast to ``dtype``."""
    return (q.float() * scale.float().reshape(-1, *(1,) * (q.ndim - 1))).to(dtype)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantisation of activations [M, K]: (q [M, K] e4m3fn, scale [M, 1] float32)."""
    x = x.float()
    scale = (x.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=_TINY)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor static quantise-dequantise of activations with ``scale`` (a 0-d float32), as ONNX's
    QuantizeLinear/DequantizeLinear pair computes it: ``saturate(round(x / scale)) * scale``."""
    return ((x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale).to(x.dtype)


# the static path as two graph-level ops, so that an exporter sees "dequantise this FP8 weight" and "quantise-dequantise
# this activation" as units (``export.fp8_onnx`` maps them to DequantizeLinear / QuantizeLinear+DequantizeLinear)
@torch.library.custom_op("mvgen::fp8_dequantize", mutates_args=())
def fp8_dequantize_op(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 weight [out, in] x per-channel scale [out] -> float32 [out, in]."""
    return q.float() * scale.float()[:, None]


@fp8_dequantize_op.register_fake
def _(q, scale):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("mvgen::fp8_fake_quantize", mutates_args=())
def fp8_fake_quantize_op(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``fake_quantize``: activations quantised to e4m3fn with one per-tensor scale and back, in x's dtype."""
    return fake_quantize(x, scale)


@fp8_fake_quantize_op.register_fake
def _(x, scale):
    return torch.empty_like(x)


@functools.cache
def has_fp8_tensor_cores(device: torch.device) -> bool:
    """Whether ``device`` multiplies FP8 natively (CUDA sm_89 / sm_90+); memoised per device (its answer never
    changes in a process)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY


def compute_path(mode: str, device: torch.device | str) -> str:
    """The path (``gemm``, ``weight_only``) a ``quantize`` mode's linears take on ``device``; "none" for none."""
    return "none" if mode == "none" else resolve_path(_PATH_OF_MODE[mode], torch.device(device))


def resolve_path(path: str, device: torch.device) -> str:
    """The path a module of ``path`` takes on ``device``: ``auto`` is ``gemm`` with FP8 tensor cores, else
    ``weight_only``."""
    if path != "auto":
        return path
    return "gemm" if has_fp8_tensor_cores(torch.device(device)) else "weight_only"


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               path: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` for an FP8 weight [out, in] with per-channel ``weight_scale`` [out], on ``path``
    (``COMPUTE_PATHS``); the result in x's dtype."""
    path = resolve_path(path, x.device)
    if path == "gemm":
        rows = x.reshape(-1, x.shape[-1])
        q, token_scale = quantize_tokens(rows)
        out = torch._scaled_mm(q, weight.t(), scale_a=token_scale, scale_b=weight_scale.float()[None],
                               out_dtype=x.dtype)
        out = out.reshape(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias
    if path == "static":
        if input_scale is None:
            raise ValueError("the static FP8 path needs a calibrated input_scale (export.fp8_onnx.calibrated)")
        x = fp8_fake_quantize_op(x, input_scale)
        return F.linear(x, fp8_dequantize_op(weight, weight_scale).to(x.dtype), bias)
    return F.linear(x, dequantize_weight(weight, weight_scale, x.dtype), bias)


# ---- the modules ------------------------------------------------------------------------------------------------
class Fp8Linear(nn.Linear):
    """A Linear whose ``weight`` [out, in] is float8_e4m3fn with ``weight_scale`` [out] (both Parameters, so a shared
    reference stream shares them as it shares any parameter and ``.to()`` keeps them shared); the bias stays in the
    compute dtype. ``path``: ``COMPUTE_PATHS``. ``input_scale``: a calibrated per-tensor activation scale (the
    ``static`` path; None until ``export.fp8_onnx`` calibrates)."""

    def __init__(self, weight: nn.Parameter, weight_scale: nn.Parameter, bias: nn.Parameter | None, path: str):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight, self.weight_scale, self.bias = weight, weight_scale, bias
        self.path = path
        self.input_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.path, self.input_scale)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, float8_e4m3fn per-channel scales, path={self.path}"


class Fp8LowRankLinear(LowRankLinear):
    """A reference-stream ``LowRankLinear`` over a shared FP8 weight: ``fp8_linear(x) + scale * (x A^T) B^T``, the
    pair in the compute dtype. A ``LowRankLinear`` still, so the export's merged reference stream
    (``merged_reference_stream``) and ``holds_shared_weights`` treat it as one; ``merged_weight`` dequantises."""

    def __init__(self, base: Fp8Linear, lora: LowRankLinear):
        nn.Linear.__init__(self, base.in_features, base.out_features, bias=False, device="meta")
        # the FP8 weight and scale are the shared ones; the bias is this module's (shared, or the adapter's own)
        self.weight, self.weight_scale, self.bias = base.weight, base.weight_scale, lora.bias
        self.lora_A, self.lora_B, self.scale = lora.lora_A, lora.lora_B, lora.scale
        self.path = base.path
        self.input_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = fp8_linear(x, self.weight, self.weight_scale, self.bias, self.path, self.input_scale)
        return base + self.lora_B(self.lora_A(x) * self.scale)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def merged_weight(self) -> torch.Tensor:
        """``dequant(W) + scale * B @ A`` in float32, in the pair's dtype (a merged stream's plain weight)."""
        dtype = self.lora_A.weight.dtype
        return LowRankDelta(self.lora_A.weight, self.lora_B.weight, self.scale).merged(self.dequantized_weight(dtype))


FP8_MODULES = (Fp8Linear, Fp8LowRankLinear)


# ---- quantising a loaded model ------------------------------------------------------------------------------------
def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every Linear the FP8 mode quantises: inside the block lists, minus
    ``KEPT_IN_COMPUTE_DTYPE``. Video blocks first, so a shared weight is first met in its own stream."""
    lists = [name for pair in model.REFERENCE_BLOCKS for name in pair if getattr(model, name, None) is not None]
    lists = [n for n in lists if not n.startswith("ref_")] + [n for n in lists if n.startswith("ref_")]
    out = []
    for list_name in lists:
        for name, module in getattr(model, list_name).named_modules():
            if isinstance(module, nn.Linear) and name and not any(part in name for part in KEPT_IN_COMPUTE_DTYPE):
                out.append((f"{list_name}.{name}", module))
    return out


def quantize_model(model: nn.Module, mode: str, stored_scales: Mapping[str, torch.Tensor] | None = None,
                   deterministic: bool = False) -> nn.Module:
    """Replace the block linears of a loaded model by FP8 ones in place (``mode``: ``QUANTIZE_MODES``, "none" does
    nothing); returns the model. ``stored_scales`` (module name -> per-channel scale [out]) are an FP8 file's own
    (``engine.backbones.wan.fp8_files``): a Linear whose weight the loader handed over still in float8_e4m3fn
    (``engine.backbones.assembly.assign``) becomes an FP8 module of those bytes and that scale as they are; a
    16/32-bit weight that came from the file (a LoRA merged into it) quantises with the file's scale where it still
    fits, instead of being rescaled. ``deterministic``: FP8 GEMMs are not batch-invariant (their kernel depends on
    M), so ``fp8`` runs weight-only there (through ``BatchInvariantOps``); ``fp8_gemm`` is refused. One INFO line on
    ``mvgen.loading``."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "none":
        return model
    path = _PATH_OF_MODE[mode]
    if deterministic:
        if path == "gemm":
            raise ValueError("quantize 'fp8_gemm' with deterministic: FP8 GEMMs are not batch-invariant; use "
                             "quantize 'fp8' (weight-only under deterministic) or 'fp8_weight_only'")
        path = "weight_only"
    stored_scales = dict(stored_scales or {})
    before = parameter_bytes(model)
    # id(original weight) -> its FP8 module: a shared weight is quantised once. Each replaced Linear is dropped as the
    # loop goes (the peak is the model plus one layer's FP8 copy); an id of a freed weight cannot come back as a
    # module's weight, since every weight still to be looked up was alive beside it
    made: dict[int, Fp8Linear] = {}
    as_stored = 0  # weights the loader handed over in float8_e4m3fn (an FP8 file's bytes)
    linears = block_linears(model)[::-1]
    while linears:
        name, module = linears.pop()
        base = made.get(id(module.weight))
        if base is None:
            as_stored += module.weight.dtype == FP8_DTYPE
            base = made[id(module.weight)] = _fp8_module(module, path, stored_scales.pop(name, None))
        replacement = base if not isinstance(module, LowRankLinear) else Fp8LowRankLinear(base, module)
        if replacement is base and base.bias is not module.bias:  # a shared weight with the block's own bias
            replacement = Fp8Linear(base.weight, base.weight_scale, module.bias, path)
        parent, _, leaf = name.rpartition(".")
        model.get_submodule(parent).register_module(leaf, replacement)
        del module
    if stored_scales:
        raise ValueError(f"FP8 scales for modules this model does not quantise: {sorted(stored_scales)[:6]}")
    _log_quantized(model, mode, path, len(made), as_stored, before)
    return model


def _fp8_module(linear: nn.Linear, path: str, stored_scale: torch.Tensor | None) -> Fp8Linear:
    """The FP8 module of a loaded Linear. A weight already in float8_e4m3fn (an FP8 file's, handed over uncast) is
    taken as it is with its file's scale; a 16/32-bit one is quantised, with the file's scale where the weight still
    fits it (a base LoRA merged into an FP8 file's weight can outgrow its row's 448 steps: that row set is rescaled by
    absmax instead)."""
    weight = linear.weight.detach()
    scale = None if stored_scale is None else stored_scale.to(device=weight.device, dtype=torch.float32)
    if weight.dtype == FP8_DTYPE:
        if scale is None or scale.shape != weight.shape[:1]:
            raise ValueError(f"an FP8 weight {list(weight.shape)} needs its per-output-channel scale "
                             f"[{weight.shape[0]}], got {None if scale is None else list(scale.shape)}")
        q = weight
    elif scale is None or (weight.float().abs().amax(dim=1) > scale * FP8_MAX * (1 + 2.0**-7)).any():
        q, scale = quantize_weight(weight)
    else:
        q = quantize_with_scale(weight, scale)
    return Fp8Linear(nn.Parameter(q, requires_grad=False), nn.Parameter(scale, requires_grad=False), linear.bias,
                     path)


def quantized_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, FP8_MODULES)]


def describe_path(model: nn.Module, device: torch.device | str) -> str:
    """How the model's FP8 linears compute on ``device``: "fp8 gemm (torch._scaled_mm, per-token activation
    scales)", "fp8 weight-only (dequantised into bfloat16)", "fp8 static (calibrated activation scales)" or "none"
    (no FP8 linear)."""
    modules = quantized_modules(model)
    if not modules:
        return "none"
    paths = sorted({resolve_path(m.path, torch.device(device)) for m in modules})
    words = {"gemm": "fp8 gemm (torch._scaled_mm, per-token activation scales)",
             "weight_only": f"fp8 weight-only (dequantised into {str(_compute_dtype(modules)).removeprefix('torch.')})",
             "static": "fp8 static (calibrated per-tensor activation scales)"}
    return " + ".join(words[p] for p in paths)


def _compute_dtype(modules) -> torch.dtype:
    for m in modules:
        if m.bias is not None:
            return m.bias.dtype
    return torch.float32


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each tensor object once (shared ones once): works on the meta
    device too, where ``reference_weights.weight_bytes``' storage pointers are all zero."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _log_quantized(model: nn.Module, mode: str, path: str, count: int, as_stored: int, before: int) -> None:
    device = next(model.parameters()).device
    after = parameter_bytes(model)
    where = ("FP8 GEMMs where the call's device has FP8 tensor cores (sm_89+), weight-only elsewhere; here: "
             if path == "auto" else "")
    scales = (f"{as_stored} as the FP8 file stored them (its bytes and scales), {count - as_stored} with "
              f"per-output-channel absmax scales" if as_stored else "with per-output-channel absmax scales")
    log.info("quantize %s: %d block linears held as float8_e4m3fn, %s (model %.1f MiB, was %.1f MiB); compute: "
             "%s%s on %s", mode, count, scales, after / 2**20, before / 2**20, where, describe_path(model, device),
             device)


def shares_reference_fp8(model: nn.Module) -> bool:
    """Whether the reference stream's FP8 linears hold the video stream's FP8 tensors (a shared stream)."""
    for video_name, ref_name in reference_pairs(model):
        video = {id(m.weight) for m in getattr(model, video_name).modules() if isinstance(m, FP8_MODULES)}
        if any(id(m.weight) in video for m in getattr(model, ref_name).modules() if isinstance(m, FP8_MODULES)):
            return True
    return False
