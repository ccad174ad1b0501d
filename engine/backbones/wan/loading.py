"""Load a Wan denoiser (one expert) from a diffusers Wan checkpoint (or a single-file transformer), with an
adapter's tensors and LoRAs (``engine.adapters.lora``: the reference stream, the video stream where MVI2V's training
changed it, a mode's modules) and base-model LoRAs merged once; the reference stream shares the video stream's
weights where it can (``engine.adapters.reference_weights``)."""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Sequence

import torch

from ...adapters.base_lora import LoraSpec, merge_base_loras
from ...adapters.lora import ORIGINAL_WAN_NAMES, ReferenceAdapter, ScaleRule, describe_scales
from ...config import MvgenConfig
from ...errors import AdapterError, CheckpointError
from ...files import load_safetensors
from ...loading import transformer_weight_files
from ...modes.view_attention import paper_view_omega
from ..assembly import (apply_full_tensors, apply_pairs, assign, dequantize_for_merge, kept_float32, reads_adapter,
                        reference_copy, require_complete, shares_reference)
from ..families import WAN
from .model import MultiViewWanTransformer
from .single_file import read_single_file_transformer

log = logging.getLogger("mvgen.loading")

_SHOWN = 6  # names listed in one error


# tensors of diffusers checkpoints that Wan2.1 does not use (diffusers ignores them too)
_IGNORED_BASE_KEYS = ("norm_added_q",)


def _base_state(files: list[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for file in files:
        state.update(load_safetensors(file, CheckpointError))
    return _without_ignored(state)


def _without_ignored(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not any(part in k for part in _IGNORED_BASE_KEYS)}


def _wan_keys(config: MvgenConfig) -> set[str]:
    """The names a base checkpoint holds: diffusers' ``WanTransformer3DModel`` of this config, which our video
    stream mirrors key for key. Whatever else the model has is the reference stream's or a mode's."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return set(WanTransformer3DModel(**config.wan_dict()).state_dict())


def _check_base_keys(model: MultiViewWanTransformer, state: dict[str, torch.Tensor]) -> set[str]:
    """The model's names that the base checkpoint holds, after checking that ``state`` holds exactly those."""
    shapes = model.state_dict()
    expected = set(shapes) & _wan_keys(model.config)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"transformer weights do not match a Wan {model.config.task} model of this config: "
            f"missing {missing[:_SHOWN]}{' ...' if len(missing) > _SHOWN else ''}, "
            f"unexpected {unexpected[:_SHOWN]}{' ...' if len(unexpected) > _SHOWN else ''}"
        )
    wrong = [f"{k} {list(state[k].shape)} vs {list(shapes[k].shape)}" for k in expected
             if state[k].shape != shapes[k].shape]
    if wrong:
        raise CheckpointError(f"transformer weights with the wrong shape (file vs config): {sorted(wrong)[:_SHOWN]}")
    return expected


def _config_tensors(config: MvgenConfig) -> dict[str, torch.Tensor]:
    """Model tensors whose value the config gives when no adapter does."""
    scales = config.view_logit_scales if config.view_logit_scales is not None else (1.0,) * config.max_references
    tensors = {"view_logit_scales": torch.tensor(scales, dtype=torch.float32)}
    if config.view_attention == "multiview":  # MVAnimate's learned omega: the paper's initial values unless trained
        tensors["view_omega"] = paper_view_omega(config.max_references)
    return tensors


def _build_ref_patch_embedding(model: MultiViewWanTransformer, tensors: dict[str, torch.Tensor]) -> None:
    """The adapter's own reference patch embedding: its weight's shape sets the input channels (16: the clean
    latent; 36: Wan's I2V layout), and it has a bias when the adapter gives one."""
    config, weight = model.config, tensors["ref_patch_embedding.weight"]
    if weight.ndim != 5 or weight.shape[0] != config.inner_dim or weight.shape[1] not in (16, 36) \
            or tuple(weight.shape[2:]) != tuple(config.patch_size):
        raise AdapterError(f"ref_patch_embedding.weight must be [{config.inner_dim}, 16 or 36, "
                           f"{', '.join(map(str, config.patch_size))}], got {list(weight.shape)}")
    with torch.device("meta"):
        model.ref_patch_embedding = torch.nn.Conv3d(weight.shape[1], config.inner_dim, kernel_size=config.patch_size,
                                                    stride=config.patch_size,
                                                    bias="ref_patch_embedding.bias" in tensors)


def _apply_full_tensors(model: MultiViewWanTransformer, state: dict[str, torch.Tensor],
                        adapter: ReferenceAdapter) -> None:
    """The adapter's full tensors (``engine.backbones.assembly``), after building the reference patch embedding
    its tensors describe."""
    if "ref_patch_embedding.weight" in adapter.tensors:
        _build_ref_patch_embedding(model, adapter.tensors)
    apply_full_tensors(model, state, adapter)


def _merge_base_loras_into_own(model: MultiViewWanTransformer, state: dict[str, torch.Tensor],
                               loras: Sequence[LoraSpec]) -> None:
    """``lora_reference`` on a shared reference stream: the video stream's merge already changed the shared
    tensors, so the base LoRAs merge into the reference stream's own tensors only. The shared ones stand in as the
    meta model's tensors (shapes, nothing computed), and what the merge makes of them is dropped."""
    own = [k for k in state if k.startswith("ref_blocks.")]
    if not own or not loras:
        return
    view = {**{k: v for k, v in model.state_dict().items() if k.startswith("ref_blocks.")}, **state}
    merge_base_loras(view, loras, prefix="ref_")
    state.update({k: view[k] for k in own})


def _log_adapter(adapter: str | Path, parsed: ReferenceAdapter, rule: ScaleRule, used: dict,
                 base_keys: set[str], unmerged: int) -> None:
    """One line per adapter: its full tensors by where they go, each LoRA scale with where its alpha came from,
    how many pairs a shared reference stream applies unmerged."""
    names = list(parsed.tensors)
    ref = sum(k.startswith("ref_blocks.") for k in names)
    video = sum(k in base_keys for k in names)
    parts = [f"{len(names)} full tensor(s): {ref} reference-stream, {video} video-stream, {len(names) - ref - video} "
             f"the base lacks (a mode's, ref_patch_embedding, view_logit_scales)"] if names else []
    parts += describe_scales(used)
    if used:
        parts.append(f"lora_convention {rule.convention!r}")
    if unmerged:
        parts.append(f"{unmerged} reference-stream pair(s) unmerged on the video stream's shared weights "
                     f"(ref_weights 'shared')")
    if parsed.video_lora is not None:
        parts.append(f"video_lora {parsed.video_lora.name} at diffusers' scale for it")
    log.info("adapter %s: %s", adapter, "; ".join(parts) or "nothing to merge")


def load_wan(transformer_dir: Path, config: MvgenConfig, adapter: str | Path | None, dtype: torch.dtype,
             device: str | torch.device, lora_scale: float | None, *, weights_file: str | Path | None = None,
             loras: Sequence[LoraSpec] = (), lora_reference: bool = False) -> MultiViewWanTransformer:
    """A Wan denoiser of ``config`` from ``transformer_dir``'s weights (or ``weights_file``), the adapter and
    base-model LoRAs merged as ``engine.backbones.registry.load_denoiser`` describes."""
    rule = ScaleRule.from_config(config, lora_scale)
    with torch.device("meta"):
        model = MultiViewWanTransformer(config)
    parsed, naming = reads_adapter(model, adapter, ORIGINAL_WAN_NAMES)
    shared = shares_reference(model, parsed, loras, lora_reference)
    fp8_scales = {}  # an FP8 file's weights stay float8 in the state, their scales here (engine.backbones.assembly)
    if weights_file is not None:
        state, fp8_scales = read_single_file_transformer(weights_file)
        state = _without_ignored(state)
    else:
        state = _base_state(transformer_weight_files(transformer_dir))
    base_keys = _check_base_keys(model, state)
    # full tensors first (the base, its copy as a merged reference stream, the config's, the adapter's), then every
    # delta on top: LoRA deltas commute, replacements do not
    if not shared:
        state.update(reference_copy(model, state, fp8_scales))
    state.update(_config_tensors(config))
    if parsed is not None:
        _apply_full_tensors(model, state, parsed)
        for key in parsed.tensors:  # a full tensor replaced the file's FP8 weight: its scale is no longer its own
            fp8_scales.pop(key, None)
    require_complete(model, state, adapter, shared)
    video_lora = [LoraSpec(parsed.video_lora)] if parsed is not None and parsed.video_lora is not None else []
    unmerged = {}
    if parsed is not None:
        dequantize_for_merge(fp8_scales, state, (f"{target}.weight" for target in parsed.loras))
        unmerged, used = apply_pairs(model, state, parsed, rule, naming)
        _log_adapter(adapter, parsed, rule, used, base_keys, len(unmerged))
    prepare = functools.partial(dequantize_for_merge, fp8_scales)
    merge_base_loras(state, [*video_lora, *loras], prepare=prepare)
    if model.ref_blocks is not None and lora_reference:
        if shared:
            _merge_base_loras_into_own(model, state, loras)
        else:
            merge_base_loras(state, loras, prefix="ref_", prepare=prepare)
    return assign(model, state, unmerged, shared=shared, dtype=dtype, device=device,
                  keep_float32=kept_float32(model, WAN), fp8_scales=fp8_scales)
