"""The one way every backbone's loader turns a base checkpoint and an adapter into a denoiser.

A family's loader (``engine.backbones.{wan,mmdit}.loading``) builds its model on the meta device and reads the base
tensors its own way (diffusers folders, Wan's single files, Wan's base-model LoRAs); from there the steps are the
same for every backbone and live here:

1. ``reads_adapter``: the adapter parsed by the one reader (``engine.adapters.lora.read_adapter``) with the model's
   own naming of its block linears;
2. ``shares_reference``: whether the reference stream can hold the video stream's weights exactly
   (``ref_weights="shared"``), else a merged copy and one INFO line saying why;
3. ``apply_full_tensors``: the adapter's full tensors, each checked against a name and shape of the model;
4. ``require_complete``: every tensor the base checkpoint lacks (a mode's) given by the adapter, else one line
   naming the tensors and the setting that needs them;
5. ``apply_pairs``: the adapter's LoRA pairs merged, except those on a weight the shared reference stream holds,
   which stay unmerged;
6. ``assign``: every tensor cast (the family's diffusers class says which modules stay float32, as
   ``from_pretrained`` keeps them) and assigned by one strict load, the shared stream's tensors aliased; then the
   config's ``quantize`` holds the block linears in 8 bits (``engine.runtime.fp8.quantize_model``).

An FP8 single file (``engine.backbones.wan.fp8_files``) goes through the same steps without passing through 16 bits:
its weights stay in float8_e4m3fn in the state, with their per-output-channel scales beside it (``fp8_scales``, by
state key). A reference copy copies bytes and scale; a weight a LoRA merges into is dequantised alone first
(``dequantize_for_merge``); an adapter's full tensor replaces one and its scale. ``assign`` hands each remaining FP8
weight uncast, with its scale, to the FP8 linear it becomes under ``--quantize fp8*``, and dequantises every other
one (all of them without ``--quantize``) alone into its dtype as it goes: the state never holds a second full copy.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..adapters import stand_in
from ..adapters.lora import (AdapterNaming, LowRankDelta, ReferenceAdapter, ScaleRule, adapter_deltas, few_names,
                             merge_deltas, read_adapter)
from ..adapters.reference_weights import reference_pairs, share_reference_stream, why_not_shared, wrap_low_rank
from ..config import MULTIVIEW_FIELDS
from ..errors import AdapterError
from ..runtime.fp8 import FP8_DTYPE, block_linears, dequantize_weight, quantize_model

log = logging.getLogger("mvgen.loading")


def reference_prefixes(model: nn.Module) -> tuple[str, ...]:
    """``("ref_blocks.", ...)``: the names under which the model's reference stream keeps its tensors."""
    return tuple(f"{ref}." for _, ref in model.REFERENCE_BLOCKS)


def reads_adapter(model: nn.Module, adapter: str | Path | None, aliases: dict[str, str] | None = None
                  ) -> tuple[ReferenceAdapter | None, AdapterNaming]:
    """The adapter parsed against the (meta) model's block linears (``aliases``: other names of a block's
    modules the family's adapters may use), and that naming."""
    naming = AdapterNaming.of(model, aliases)
    # a Stand-In file (kijai's spelling) is an adapter as it is, its tensors renamed on the way in
    spelling = stand_in.read_as_adapter if adapter is not None and stand_in.is_stand_in_file(adapter) else None
    parsed = read_adapter(adapter, naming, spelling) if adapter is not None else None
    if parsed is not None and parsed.reference_loras and model.config.ref_mode != "dual_stream":
        raise AdapterError(f"a reference-stream LoRA needs ref_mode='dual_stream', got {model.config.ref_mode!r}")
    return parsed, naming


def shares_reference(model: nn.Module, parsed: ReferenceAdapter | None, loras: Sequence = (),
                     lora_reference: bool = False) -> bool:
    """Whether the reference stream shares the video stream's weights. When the config asks for it and sharing
    cannot be exact, the model's config says ``ref_weights="merged"`` and one INFO line says why: whoever asked for
    the smaller model learns they did not get it."""
    if not reference_pairs(model) or model.config.ref_weights != "shared":
        return False
    prefixes = reference_prefixes(model)
    ref_keys = {k for k in model.state_dict() if k.startswith(prefixes)}
    why = why_not_shared(model.REFERENCE_BLOCKS, ref_keys, parsed, loras, lora_reference)
    if why is None:
        return True
    log.info("ref_weights 'shared' cannot be exact, so the reference stream is a merged copy of the blocks "
             "(ref_weights 'merged', ~1.9x the base model's parameters): %s", why)
    model.config = model.config.replace(ref_weights="merged")
    return False


def reference_copy(model: nn.Module, state: dict[str, torch.Tensor],
                   fp8_scales: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """MVI2V's initialisation of a merged reference stream: each reference block's tensors cloned from the video
    block of the same index (empty without a reference stream of its own). An FP8 weight's copy gets its scale in
    ``fp8_scales`` too."""
    names, out = set(model.state_dict()), {}
    for video, ref in reference_pairs(model):  # a reference block may hold fewer modules (no text stream)
        for key, value in state.items():
            name = f"{ref}.{key.removeprefix(video + '.')}"
            if key.startswith(f"{video}.") and name in names:
                out[name] = value.clone()
                if fp8_scales is not None and key in fp8_scales:
                    fp8_scales[name] = fp8_scales[key]
    return out


def dequantize_for_merge(fp8_scales: dict[str, torch.Tensor], state: dict[str, torch.Tensor], keys) -> None:
    """The FP8 weights among ``keys`` replaced by ``q * scale`` in float32, one at a time, before a LoRA merges into
    them; their scales stay in ``fp8_scales``, so that ``--quantize`` requantises a merged weight with its file's scale
    where it still fits (``engine.runtime.fp8.quantize_model``)."""
    for key in keys:
        if key in fp8_scales and key in state and state[key].dtype == FP8_DTYPE:
            state[key] = dequantize_weight(state[key], fp8_scales[key], torch.float32)


def apply_full_tensors(model: nn.Module, state: dict[str, torch.Tensor], adapter: ReferenceAdapter) -> None:
    """Every full tensor of the adapter replaces (or adds) the model tensor of its name, after checking that the
    built model has that name, with that shape."""
    tensors = adapter.tensors
    shapes = model.state_dict()
    unknown = sorted(set(tensors) - set(shapes))
    if unknown:
        lacking = [ref for _, ref in model.REFERENCE_BLOCKS if getattr(model, ref, None) is None
                   and any(k.startswith(f"{ref}.") for k in unknown)]
        hint = f" ({', '.join(lacking)} exist only with ref_mode='dual_stream')" if lacking else ""
        raise AdapterError(f"adapter tensor(s) not understood: {few_names(unknown)} are no parameter or buffer of "
                           f"this model{hint}; full tensors are named as the model's (the reference blocks', the "
                           f"video blocks', the patch embedding's, a mode's modules)")
    wrong = [f"{k} {list(t.shape)} vs {list(shapes[k].shape)}" for k, t in tensors.items()
             if t.shape != shapes[k].shape]
    if wrong:
        raise AdapterError(f"adapter tensor(s) with the wrong shape (adapter vs model): {few_names(wrong)}")
    state.update(tensors)


def require_complete(model: nn.Module, state: dict[str, torch.Tensor], adapter: str | Path | None,
                     shared: bool) -> None:
    """Every tensor the model has and the base checkpoint does not (the reference stream's copy aside) comes
    from the adapter: refuse, naming the tensors and the mode that adds them, before anything merges. A shared
    reference stream's tensors that the adapter does not give are the video stream's."""
    prefixes = reference_prefixes(model)
    missing = {k for k in set(model.state_dict()) - set(state) if not (shared and k.startswith(prefixes))}
    if not missing:
        return
    who = f"the adapter {adapter} lacks" if adapter is not None else "no adapter was given, so the model lacks"
    needs = "; ".join(f"{few_names(names)}, which {mode} needs" for mode, names in _modes_needing(model, missing))
    raise AdapterError(f"{who} tensors not in the base checkpoint: {needs}; an adapter for such a mode carries "
                       f"them as full tensors under these names")


def _modes_needing(model: nn.Module, missing: set[str]) -> list[tuple[str, list[str]]]:
    """``[(mode, names)]``: each of the config's non-default multi-view settings with the missing names it adds to
    the model (those a model built with that setting at its default lacks); the rest are the model's own."""
    config, found, left = model.config, [], set(missing)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name in MULTIVIEW_FIELDS:
        value = getattr(config, name)
        if value == defaults[name] or not left:
            continue
        try:
            plain = config.replace(**{name: defaults[name]})
        except ValueError:  # a setting that cannot return to its default alone
            continue
        with torch.device("meta"):
            keys = set(type(model)(plain).state_dict())
        names = sorted(left - keys)
        if names:
            found.append((f"{name}={value!r}", names))
            left -= set(names)
    return found + ([("this model", sorted(left))] if left else [])


def apply_pairs(model: nn.Module, state: dict[str, torch.Tensor], adapter: ReferenceAdapter, rule: ScaleRule,
                naming: AdapterNaming) -> tuple[dict[str, LowRankDelta], dict[str, Counter]]:
    """The adapter's LoRA pairs merged into ``state``; those on a weight a shared reference stream holds (no entry
    of ``state``) are returned unmerged, with the scales used per stream (for the log)."""
    deltas, used = adapter_deltas(adapter, rule, {k: v.shape for k, v in model.state_dict().items()}, naming)
    unmerged = {target: delta for target, delta in deltas.items() if f"{target}.weight" not in state}
    merge_deltas(state, {target: delta for target, delta in deltas.items() if target not in unmerged})
    return unmerged, used


def kept_float32(model: nn.Module, family) -> tuple[str, ...]:
    """Module names whose tensors stay float32 whatever the compute dtype: the family's diffusers class's
    ``_keep_in_fp32_modules`` (Wan's norms, modulation tables and time embedder; none for HunyuanVideo), and the
    model's own additions (``FP32_PARAMS``: Wan's view tables)."""
    import diffusers

    keep = getattr(diffusers, family.diffusers_class)._keep_in_fp32_modules or ()
    return (*keep, *getattr(model, "FP32_PARAMS", ()))


def assign(model: nn.Module, state: dict[str, torch.Tensor], unmerged: dict[str, LowRankDelta], *, shared: bool,
           dtype: torch.dtype, device: str | torch.device, keep_float32: Sequence[str],
           fp8_scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The meta model given ``state`` by one strict load, then quantised as its config says: the unmerged pairs as
    ``LowRankLinear``s, every floating tensor in ``dtype`` (float32 where a dotted part of its name is in
    ``keep_float32``, diffusers' rule), a shared reference stream's tensors the video stream's own objects. An FP8
    weight (``fp8_scales`` holds its scale) stays as it is where ``quantize`` makes its module an FP8 linear, and is
    dequantised into its dtype otherwise (module docstring). ``state`` is emptied: the model holds its tensors.
    """
    wrap_low_rank(model, {target: (delta.rank, delta.scale) for target, delta in unmerged.items()})
    for target, delta in unmerged.items():
        state[f"{target}.lora_A.weight"], state[f"{target}.lora_B.weight"] = delta.down, delta.up
    fp8_scales = fp8_scales or {}
    quantized = {f"{name}.weight" for name, _ in block_linears(model)} if model.config.quantize != "none" else set()
    keep = set(keep_float32)
    for key, value in state.items():  # entry by entry: a replaced tensor is freed before the next one is made
        target = torch.float32 if keep.intersection(key.split(".")) else dtype
        if value.dtype == FP8_DTYPE and key not in fp8_scales:
            raise AdapterError(f"{key}: a float8_e4m3fn tensor that comes with no scale (an adapter's?); FP8 weights "
                               f"are read from a base single file's scale layout only")
        if value.dtype == FP8_DTYPE and key not in quantized:
            value = dequantize_weight(value, fp8_scales[key], target)
        elif value.is_floating_point() and value.dtype != FP8_DTYPE:
            value = value.to(target)
        state[key] = value.to(device)
    prefixes = reference_prefixes(model)
    own = {k for k in state if k.startswith(prefixes)}
    if shared:  # each shared tensor under its reference name too (the same tensor, no copy), for the strict load
        video_of = {f"{ref}.": f"{video}." for video, ref in reference_pairs(model)}
        for key in model.state_dict():
            prefix = next((p for p in video_of if key.startswith(p)), None)
            if prefix is not None and key not in own:
                state[key] = state[video_of[prefix] + key.removeprefix(prefix)]
    model.load_state_dict(state, strict=True, assign=True)
    if shared:
        share_reference_stream(model, own)
    # the file's scales of the weights that become FP8 linears: as they are, or as a merged weight's hint
    stored = {key.removesuffix(".weight"): fp8_scales[key] for key in quantized & set(fp8_scales)}
    state.clear()  # the model holds every tensor now; quantising frees each replaced weight only if nothing else does
    model = model.eval().requires_grad_(False)
    return quantize_model(model, model.config.quantize, stored, model.config.deterministic)
