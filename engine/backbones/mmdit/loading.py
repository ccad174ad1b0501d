"""Load the MMDiT denoiser (``engine.backbones.mmdit.model``) from a diffusers ``HunyuanVideoTransformer3DModel``
directory, with MVI2V's reference stream initialised from the video stream and an adapter applied, through the
steps every backbone shares (``engine.backbones.assembly``).

An MMDiT adapter is read like a Wan one (``engine.adapters.lora``: PEFT, diffusers or kohya spellings, kohya
``.alpha``, PEFT's ``adapter_config.json``, ``mvgen_config.json``'s convention, alpha and rank), in diffusers'
module names: LoRA pairs on any linear of ``ref_blocks.N`` / ``ref_single_blocks.N`` (or, named after the video
blocks ``transformer_blocks.N`` / ``single_transformer_blocks.N``, routed to the reference stream unless
``"blocks_lora": "video"``); any other tensor is a full tensor named as the parameter it replaces. With
``ref_weights="shared"`` (the default) the reference modules hold the video modules' weights and apply their pairs
unmerged; an adapter that changes the video stream makes them a merged copy, and one INFO line says why.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from ...adapters.lora import ScaleRule, describe_scales, few_names
from ...config import MvgenConfig
from ...errors import AdapterError, CheckpointError
from ...files import load_safetensors
from ...loading import transformer_weight_files
from ...modes.view_attention import paper_view_omega
from ..assembly import (apply_full_tensors, apply_pairs, assign, kept_float32, reads_adapter, reference_copy,
                        require_complete, shares_reference)
from ..families import MMDIT
from .model import MultiViewMMDiT

log = logging.getLogger("mvgen.loading")


def load_mmdit(transformer_dir: Path, config: MvgenConfig, adapter: str | Path | None, dtype: torch.dtype,
               device: str | torch.device, lora_scale: float | None = None, *, weights_file: str | Path | None = None,
               loras: Sequence = (), lora_reference: bool = False) -> MultiViewMMDiT:
    """The MMDiT of ``transformer_dir`` with its reference stream (MVI2V's initialisation: the video stream's
    modules) and the adapter's tensors and LoRA pairs, ``W + scale * B @ A`` (module docstring)."""
    refused = [name for name, value in (("weights_file", weights_file), ("loras", loras),
                                        ("lora_reference", lora_reference)) if value]
    if refused:
        raise CheckpointError(f"{', '.join(refused)}: Wan-only (single-file transformers and base-model LoRAs "
                              "are not implemented for the MMDiT)")
    rule = ScaleRule.from_config(config, lora_scale)
    with torch.device("meta"):
        model = MultiViewMMDiT(config)
    parsed, naming = reads_adapter(model, adapter)
    if parsed is not None and parsed.video_lora is not None:
        raise AdapterError(f"adapter {adapter}: video_lora is Wan-only (its base-LoRA spellings are Wan's); give "
                           "the MMDiT's video-stream changes as full tensors or pairs with \"blocks_lora\": \"video\"")
    shared = shares_reference(model, parsed)
    state = {}
    for file in transformer_weight_files(transformer_dir):
        state.update(load_safetensors(file, CheckpointError))
    base = _base_keys(config)
    missing, unexpected = base - set(state), set(state) - base
    if missing or unexpected:
        parts = [f"missing {few_names(missing)}" if missing else "", f"unexpected {few_names(unexpected)}"
                 if unexpected else ""]
        raise CheckpointError(f"{transformer_dir}: not a HunyuanVideoTransformer3DModel of this config: "
                              f"{'; '.join(p for p in parts if p)}")
    if not shared:
        state.update(reference_copy(model, state))
    if config.view_attention == "multiview":  # MVAnimate's omega: the paper's unless the adapter trained its own
        state["view_omega"] = paper_view_omega(config.max_references)
    if parsed is not None:
        apply_full_tensors(model, state, parsed)
    require_complete(model, state, adapter, shared)
    unmerged = {}
    if parsed is not None:
        unmerged, used = apply_pairs(model, state, parsed, rule, naming)
        log.info("adapter %s: %d full tensor(s); %s%s", adapter, len(parsed.tensors),
                 "; ".join(describe_scales(used)) or "no LoRA pairs",
                 f"; {len(unmerged)} pair(s) unmerged on the video stream's shared weights" if unmerged else "")
    return assign(model, state, unmerged, shared=shared, dtype=dtype, device=device,
                  keep_float32=kept_float32(model, MMDIT))


def _base_keys(config: MvgenConfig) -> set[str]:
    """The names a base checkpoint holds: diffusers' ``HunyuanVideoTransformer3DModel`` of this config, which the
    video and text streams mirror key for key; whatever else the model has is the reference stream's or a mode's."""
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        return set(HunyuanVideoTransformer3DModel(**config.mmdit_dict()).state_dict())
