"""Load the MMDiT denoiser (``engine.backbones.mmdit.model``) from a diffusers ``HunyuanVideoTransformer3DModel`` directory, with
MVI2V's reference stream initialised from the video stream and an adapter's LoRA merged into it.

An MMDiT adapter is PEFT-named: LoRA pairs ``[transformer.]ref_blocks.N.<module>.lora_A/lora_B[.default].weight``
(or ``ref_single_blocks.N...``) on any linear of the reference stream, scaled by the config's
``lora_convention``/``lora_alpha``/``lora_rank`` like Wan adapters (``engine.adapters.lora.ScaleRule``); any other tensor is a
full tensor named as the denoiser's parameter it replaces. Pairs on the video or text stream are refused: MVI2V
trains the reference stream. The reference stream always holds its own weights with the LoRA merged (Wan's
``ref_weights="shared"`` is Wan-only: an MMDiT block's reference modules are a third of the block, and the
single-stream copy is a whole block).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import torch

from ...config import MvgenConfig
from ...files import load_safetensors
from ...errors import AdapterError, CheckpointError
from ...adapters.lora import LoraPair, LowRankDelta, ScaleRule, few_names, merge_deltas
from ...adapters.reference_weights import share_reference_stream, wrap_low_rank
from ...loading import transformer_weight_files
from .model import MultiViewMMDiT

log = logging.getLogger("mvgen.loading")

_PAIR = re.compile(r"^(?:base_model\.model\.|transformer\.)?(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$")
_PREFIX = re.compile(r"^(?:base_model\.model\.|transformer\.)")
_REFERENCE = ("ref_blocks.", "ref_single_blocks.")


def load_mmdit(transformer_dir: Path, config: MvgenConfig, adapter: str | Path | None, dtype: torch.dtype,
               device: str | torch.device, lora_scale: float | None = None, *, weights_file: str | Path | None = None,
               loras: Sequence = (), lora_reference: bool = False) -> MultiViewMMDiT:
    """The MMDiT of ``transformer_dir`` with its reference stream: the video stream's modules (MVI2V's
    initialisation) plus the adapter's LoRA, ``W + scale * B @ A``. With ``ref_weights="shared"`` (the default) the
    reference modules hold the video modules' weights themselves and apply the LoRA unmerged
    (``engine.adapters.reference_weights``); where the adapter changes a video-stream tensor the reference stream
    would share, it gets a merged copy instead, and one INFO line says why."""
    refused = [name for name, value in (("weights_file", weights_file), ("loras", loras),
                                        ("lora_reference", lora_reference)) if value]
    if refused:
        raise CheckpointError(f"{', '.join(refused)}: Wan-only (single-file transformers and base-model LoRAs "
                              "are not implemented for the MMDiT)")
    weight_files = transformer_weight_files(transformer_dir)
    pairs, tensors = read_mmdit_adapter(adapter) if adapter is not None else ({}, {})
    changed_video = [k for k in tensors if not k.startswith(_REFERENCE)]
    if config.ref_weights == "shared" and config.ref_mode == "dual_stream" and changed_video:
        log.info("MMDiT: the reference stream holds a merged copy: the adapter changes the video stream's %s, not "
                 "the reference stream's", few_names(changed_video))
        config = config.replace(ref_weights="merged")
    shared = config.ref_weights == "shared" and config.ref_mode == "dual_stream"
    with torch.device("meta"):
        model = MultiViewMMDiT(config)
    expected = model.state_dict()
    state = {}
    for file in weight_files:
        state.update(load_safetensors(file, CheckpointError))
    base = {k for k in expected if not k.startswith(_REFERENCE)}
    missing, unexpected = base - set(state), set(state) - base
    if missing or unexpected:
        parts = [f"missing {few_names(missing)}" if missing else "", f"unexpected {few_names(unexpected)}"
                 if unexpected else ""]
        raise CheckpointError(f"{transformer_dir}: not a HunyuanVideoTransformer3DModel of this config: "
                              f"{'; '.join(p for p in parts if p)}")
    if not shared:
        state.update(model.reference_state_from_base(state))
    unmerged = {}
    if adapter is not None:
        shapes = {k: v.shape for k, v in expected.items()}
        bad = [k for k, v in tensors.items() if k not in shapes or tuple(v.shape) != tuple(shapes[k])]
        if bad:
            raise AdapterError(f"adapter {adapter}: full tensor(s) naming no parameter of this MMDiT (or of another "
                               f"shape): {few_names(bad)}")
        state.update(tensors)
        rule = ScaleRule.from_config(config, lora_scale)
        deltas = {target: _delta(target, pair, shapes, rule, model) for target, pair in sorted(pairs.items())}
        # a weight the reference stream shares is no entry of the state: its pair stays unmerged
        unmerged = {target: delta for target, delta in deltas.items() if f"{target}.weight" not in state}
        merge_deltas(state, {target: delta for target, delta in deltas.items() if target not in unmerged})
        log.info("adapter %s: %d LoRA pair(s) on the MMDiT's reference stream (%d applied unmerged on shared "
                 "weights), %d full tensor(s)", adapter, len(deltas), len(unmerged), len(tensors))
    wrap_low_rank(model, {target: (delta.rank, delta.scale) for target, delta in unmerged.items()})
    for target, delta in unmerged.items():
        state[f"{target}.lora_A.weight"], state[f"{target}.lora_B.weight"] = delta.down, delta.up
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    own = {k for k in state if k.startswith(_REFERENCE)}
    if shared:  # each shared tensor under its reference name too (the same tensor, no copy), for the strict load
        video_of = dict(zip(_REFERENCE, (f"{video}." for video, _ in model.REFERENCE_BLOCKS)))
        for key in model.state_dict():
            prefix = next((p for p in _REFERENCE if key.startswith(p)), None)
            if prefix is not None and key not in own:
                state[key] = state[video_of[prefix] + key.removeprefix(prefix)]
    model.load_state_dict(state, strict=True, assign=True)
    if shared:
        share_reference_stream(model, own)
    return model.eval().requires_grad_(False)


def read_mmdit_adapter(path: str | Path) -> tuple[dict[str, LoraPair], dict[str, torch.Tensor]]:
    """(LoRA pairs by target module, full tensors by parameter name) of an adapter file or folder (its
    ``*.safetensors``)."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter not found: {path}")
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".safetensors" for f in files):
        raise AdapterError(f"adapter must be a .safetensors file or a folder of them, got {path}")
    pairs: dict[str, LoraPair] = {}
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for key, tensor in load_safetensors(file, AdapterError).items():
            match = _PAIR.match(key)
            if match is None:
                if "lora" in key:
                    raise AdapterError(f"adapter key not understood: {key} (PEFT's <module>.lora_A/lora_B.weight)")
                tensors[_PREFIX.sub("", key)] = tensor
                continue
            target, kind = match[1], match[2]
            pair = pairs.setdefault(target, LoraPair(name=target))
            if (pair.down if kind == "lora_A" else pair.up) is not None:
                raise AdapterError(f"adapter gives {target}.{kind} twice")
            if kind == "lora_A":
                pair.down = tensor
            else:
                pair.up = tensor
    halves = [t for t, p in pairs.items() if p.down is None or p.up is None]
    if halves:
        raise AdapterError(f"adapter LoRA missing its A or B half for: {few_names(halves)}")
    return pairs, tensors


def _delta(target: str, pair: LoraPair, shapes: dict, rule: ScaleRule, model: MultiViewMMDiT) -> LowRankDelta:
    if not target.startswith(_REFERENCE):
        raise AdapterError(f"adapter LoRA on {target}: an MMDiT adapter trains the reference stream "
                           f"(ref_blocks.N / ref_single_blocks.N)")
    if model.ref_blocks is None:
        raise AdapterError(f"adapter LoRA on {target} needs ref_mode='dual_stream' (Token-Concat has no reference "
                           "stream of its own)")
    shape = shapes.get(f"{target}.weight")
    if shape is None or len(shape) != 2:
        raise AdapterError(f"adapter LoRA on {target}: this MMDiT has no such linear")
    if (pair.down.ndim, pair.up.ndim) != (2, 2) or pair.down.shape[0] != pair.up.shape[1] or \
            (pair.up.shape[0], pair.down.shape[1]) != tuple(shape):
        raise AdapterError(f"adapter LoRA for {target} has A {list(pair.down.shape)} / B {list(pair.up.shape)}, "
                           f"which does not fit the weight {list(shape)}")
    scale, _ = rule.scale(target, pair)
    return LowRankDelta(pair.down, pair.up, scale)
