"""FP8 single-file Wan transformers as users ship them: which convention a file follows, its scales, its weights.

Conventions (read from each tool's public loader/converter code; key names after the ComfyUI prefix is stripped):

- ``plain`` -- ComfyUI's ``*_fp8_e4m3fn.safetensors`` and ComfyUI-WanVideoWrapper's (Kijai's) FP8 files: weights
  cast to ``float8_e4m3fn`` with no scale at all (the dequantised weight is the FP8 value itself); what is not cast
  differs per tool (WanVideoWrapper keeps names with ``norm``, ``head``, ``bias``, ``time_``, ``patch_embedding``,
  ``img_emb``, ``modulation`` in 16 bits and casts the rest, ``text_embedding`` included).
- ``comfyui_scaled`` -- ComfyUI's ``*_fp8_scaled.safetensors`` (also LightX2V's ``--comfyui_mode`` output and
  Kijai's ``*_fp8_scaled_KJ`` files): a marker tensor ``scaled_fp8`` (its dtype the FP8 format, float32 meaning
  e4m3fn; two elements: "do not multiply in FP8"), one per-tensor ``<layer>.scale_weight`` per FP8 weight
  (weight = q * scale), optional ``<layer>.scale_input`` (a static activation scale; here activations are scaled
  per token, so it is read past).
- ``comfyui_quant`` -- ComfyUI's newer mixed-precision files: ``<layer>.comfy_quant`` (uint8 bytes of a JSON
  ``{"format": "float8_e4m3fn"}``) beside ``<layer>.weight_scale`` (per-tensor) and optional ``<layer>.input_scale``.
- ``lightx2v`` -- LightX2V's ``--linear_type fp8`` single files: ``<layer>.weight_scale`` per output channel,
  shape [out, 1] float32, absmax / 448 per row, no marker.

Anything else that looks like a scale (block-wise ``[out/128, in/128]`` scales, ``weight_scale_inv``, a scale
without an FP8 weight, ``scale_weight`` without the marker, an e5m2 weight) is refused in one line naming the key.

What the loader gets: ``split_scales`` leaves each FP8 weight in float8_e4m3fn as the file stores it and gives its
scale per output channel (a per-tensor scale broadcast, an unscaled file's ones); ``single_file`` renames both.
``engine.backbones.assembly`` then hands a block linear's weight and scale uncast to its FP8 module under
``--quantize fp8*`` (the file's own bytes: the same bytes and scales the former path recovered by requantising a
bfloat16 copy) and dequantises every other FP8 tensor, and all of them without ``--quantize``, alone into the compute
dtype as it goes. Loading the CPU-sized checkpoint's LightX2V file (50.3 MiB; ``mvgen bench fp8-load``, AMD EPYC, 2
cores): ``--quantize fp8`` peaks at +70.5 MiB for its 60.0 MiB model (1.18x; the former bfloat16 pass: +209.2 MiB,
3.49x, the same FP8 bytes and scales by SHA-256); without ``--quantize`` bfloat16 +144.7 MiB (1.58x; formerly 1.55x)
and float32 +244 to +269 MiB over two runs (1.34x to 1.48x; formerly 1.04x). No load holds a second copy of the model:
above it is the file, which safetensors maps whole and unmaps with its last tensor (the former path's anonymous
bfloat16 copies let the mapping go early in float32).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import CheckpointError
from ...runtime.fp8 import FP8_DTYPE

log = logging.getLogger("mvgen.loading")

MARKER = "scaled_fp8"  # ComfyUI's fp8_scaled marker
# per-layer suffixes each convention uses, replacing the weight's ".weight"
_SCALE_SUFFIX = {"comfyui_scaled": ".scale_weight", "comfyui_quant": ".weight_scale", "lightx2v": ".weight_scale"}
_INPUT_SUFFIXES = (".scale_input", ".input_scale")  # static activation scales: read past
_QUANT_CONF = ".comfy_quant"
# Wan's own parameter whose name holds "scale" (every other key whose last part does is taken for an FP8 scale)
_NOT_SCALES = ("scale_shift_table",)
_LAYOUTS = ("known FP8 layouts: ComfyUI fp8_e4m3fn (no scales), ComfyUI fp8_scaled ('scaled_fp8' marker + per-tensor "
            "<layer>.scale_weight), ComfyUI comfy_quant (<layer>.comfy_quant + per-tensor <layer>.weight_scale), "
            "LightX2V (per-channel <layer>.weight_scale [out, 1])")


@dataclass(frozen=True)
class Fp8Layout:
    """A file's FP8 convention (``plain``, ``comfyui_scaled``, ``comfyui_quant``, ``lightx2v``: module docstring) and,
    per FP8 weight key, its scale key (None: unscaled); ``extra`` the keys that are the convention's bookkeeping
    (marker, input scales, comfy_quant tags), dropped from the state."""

    convention: str
    scales: dict[str, str | None]
    extra: tuple[str, ...]


def fp8_layout(path: Path, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], comfy_quant=None
               ) -> Fp8Layout | None:
    """The FP8 layout of a file from its keys' (dtype, shape) (prefix stripped); None for a file without FP8.
    ``comfy_quant(key)`` reads one ``.comfy_quant`` tag's bytes. ``CheckpointError`` naming the key otherwise."""
    fp8 = {k for k, (dtype, _) in tensors.items() if dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
           and k != MARKER}
    tagged = {k for k in tensors if k.endswith(_QUANT_CONF)}
    scale_like = {k for k in tensors if _is_scale(k)}
    if not fp8 and not scale_like and MARKER not in tensors and not tagged:
        return None
    wrong = sorted(k for k in fp8 if tensors[k][0] != FP8_DTYPE)
    if wrong:
        raise CheckpointError(f"{path}: {wrong[0]!r} is {tensors[wrong[0]][0]}; only float8_e4m3fn FP8 weights are "
                              f"read; {_LAYOUTS}")
    if MARKER in tensors:
        convention = "comfyui_scaled"
    elif tagged:
        convention = "comfyui_quant"
    elif any(k.endswith(".weight_scale") for k in scale_like):
        convention = "lightx2v"
    else:
        convention = "plain"
    suffix = _SCALE_SUFFIX.get(convention)
    extra = {k for k in scale_like if k.endswith(_INPUT_SUFFIXES)} | tagged | ({MARKER} & set(tensors))
    scales = {}
    for key in sorted(fp8):
        scale = key.removesuffix(".weight") + suffix if suffix and key.endswith(".weight") else None
        scales[key] = scale if scale in tensors else None
        if scale in tensors:
            _check_scale(path, convention, scale, tensors[scale], tensors[key][1])
    used = {s for s in scales.values() if s is not None}
    unknown = sorted(scale_like - used - extra)
    if unknown:
        key = unknown[0]
        dtype, shape = tensors[key]
        if key.endswith(".scale_weight") and convention != "comfyui_scaled":
            what = f"a ComfyUI fp8_scaled scale in a file without the {MARKER!r} marker (mislabelled)"
        elif key.removesuffix(key.rpartition(".")[2]) + "weight" not in fp8:
            what = "a scale of no float8_e4m3fn weight"
        else:
            what = f"not this file's {convention} scale layout"
        raise CheckpointError(f"{path}: unknown FP8 scale layout: key {key!r} ({str(dtype).removeprefix('torch.')} "
                              f"{list(shape)}) is {what}; {_LAYOUTS}")
    if convention == "comfyui_scaled" and not used:
        raise CheckpointError(f"{path}: marked ComfyUI fp8_scaled ({MARKER!r}) but holds no <layer>.scale_weight; "
                              f"{_LAYOUTS}")
    if convention == "comfyui_quant":
        for key in sorted(tagged):
            fmt = comfy_quant(key).get("format") if comfy_quant else None
            if fmt != "float8_e4m3fn":
                raise CheckpointError(f"{path}: {key!r} declares format {fmt!r}; only float8_e4m3fn is read; "
                                      f"{_LAYOUTS}")
    return Fp8Layout(convention, scales, tuple(sorted(extra)))


def _is_scale(key: str) -> bool:
    last = key.rpartition(".")[2]
    return "scale" in last and last not in _NOT_SCALES and key != MARKER


def _check_scale(path: Path, convention: str, key: str, info: tuple, weight_shape: tuple) -> None:
    """A scale is float32 (or 16-bit) and per-tensor ([] or [1]) or, for LightX2V, per output channel ([out, 1]
    or [out])."""
    dtype, shape = info
    rows = weight_shape[0] if weight_shape else None
    per_tensor = tuple(shape) in ((), (1,))
    per_channel = tuple(shape) in ((rows, 1), (rows,))
    if dtype not in (torch.float32, torch.float16, torch.bfloat16) or not (per_tensor or per_channel):
        raise CheckpointError(f"{path}: unknown FP8 scale layout: key {key!r} ({str(dtype).removeprefix('torch.')} "
                              f"{list(shape)}) for a weight {list(weight_shape)} is neither per-tensor nor per output "
                              f"channel ({convention}); {_LAYOUTS}")


def channel_scale(scale: torch.Tensor | None, rows: int) -> torch.Tensor:
    """A stored scale (per-tensor, per-channel, or None for an unscaled file) as float32 [rows]."""
    if scale is None:
        return torch.ones(rows, dtype=torch.float32)
    return scale.float().reshape(-1).expand(rows).contiguous() if scale.numel() == 1 else scale.float().reshape(rows)


def split_scales(path: Path, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                       dict[str, torch.Tensor]]:
    """(``state`` (prefix stripped) without the convention's scale and bookkeeping keys, its FP8 weights left in
    float8_e4m3fn as stored; per FP8 weight key, its scale as float32 [out]: ``channel_scale``). A file without FP8
    comes back as it is, with no scales."""
    layout = fp8_layout(path, {k: (v.dtype, tuple(v.shape)) for k, v in state.items()},
                        lambda key: read_tag(state[key]))
    if layout is None:
        return state, {}
    dropped = set(layout.extra) | {s for s in layout.scales.values() if s is not None}
    scales = {key: channel_scale(state[scale_key] if scale_key else None, state[key].shape[0])
              for key, scale_key in layout.scales.items()}
    log.info("%s: FP8 file (%s): %d float8_e4m3fn tensors handed to the loader as stored, each with its "
             "per-output-channel scale (--quantize fp8 keeps the block linears' bytes; other tensors, and every one "
             "without --quantize, are dequantised one by one into the compute dtype)", path, layout.convention,
             len(scales))
    return {k: v for k, v in state.items() if k not in dropped}, scales


def read_tag(tensor: torch.Tensor) -> dict:
    try:
        return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode())
    except (ValueError, UnicodeDecodeError):
        return {}
