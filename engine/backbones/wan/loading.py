"""Load a Wan denoiser (one expert) from a diffusers Wan checkpoint (or a single-file transformer), with an
adapter's tensors and LoRAs (``engine.adapters.lora``: the reference stream, the video stream where MVI2V's training
changed it, a mode's modules) and base-model LoRAs merged once; the reference stream shares the video stream's
weights where it can (``engine.adapters.reference_weights``)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch

from ...adapters.base_lora import LoraSpec, merge_base_loras
from ...adapters.lora import (ReferenceAdapter, ScaleRule, adapter_deltas, describe_scales, few_names, merge_deltas,
                              read_adapter)
from ...adapters.reference_weights import share_reference_stream, why_not_shared, wrap_low_rank
from ...config import MvgenConfig
from ...errors import AdapterError, CheckpointError
from ...files import load_safetensors
from ...loading import transformer_weight_files
from ...modes.view_attention import paper_view_omega
from .model import MultiViewWanTransformer
from .single_file import read_single_file_transformer

log = logging.getLogger("mvgen.loading")

# kept in float32 whatever the compute dtype, as diffusers' Wan does
_FP32_PARAMS = ("scale_shift_table", "condition_embedder.time_embedder", "norm1", "norm2", "norm3", "view_logit_scales",
                "view_omega")
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
    """Every full tensor of the adapter replaces (or adds) the model tensor of its name, after checking that the
    built model has that name, with that shape."""
    tensors = adapter.tensors
    if "ref_patch_embedding.weight" in tensors:
        _build_ref_patch_embedding(model, tensors)
    shapes = model.state_dict()
    unknown = sorted(set(tensors) - set(shapes))
    if unknown:
        hint = (" (ref_blocks exist only with ref_mode='dual_stream')"
                if model.ref_blocks is None and any(k.startswith("ref_blocks.") for k in unknown) else "")
        raise AdapterError(f"adapter tensor(s) not understood: {few_names(unknown)} are no parameter or buffer of "
                           f"this model{hint}; full tensors are named as the model's (ref_blocks.N.*, blocks.N.*, "
                           f"patch_embedding.weight, a mode's modules)")
    wrong = [f"{k} {list(t.shape)} vs {list(shapes[k].shape)}" for k, t in tensors.items()
             if t.shape != shapes[k].shape]
    if wrong:
        raise AdapterError(f"adapter tensor(s) with the wrong shape (adapter vs model): {few_names(wrong)}")
    state.update(tensors)


def _require_complete(model: MultiViewWanTransformer, state: dict[str, torch.Tensor], adapter: Path | None,
                      shared: bool) -> None:
    """Every tensor the model has and the base checkpoint does not (the reference stream's copy aside) comes
    from the adapter: refuse, naming the tensors and the mode that adds them, before anything merges. A shared
    reference stream's tensors that the adapter does not give are the video stream's."""
    missing = {k for k in set(model.state_dict()) - set(state) if not (shared and k.startswith("ref_blocks."))}
    if not missing:
        return
    who = f"the adapter {adapter} lacks" if adapter is not None else "no adapter was given, so the model lacks"
    needs = "; ".join(f"{few_names(names)}, which {mode} needs"
                      for mode, names in _modes_needing(model.config, missing))
    raise AdapterError(f"{who} tensors not in the base checkpoint: {needs}; an adapter for such a mode carries "
                       f"them as full tensors under these names")


def _modes_needing(config: MvgenConfig, missing: set[str]) -> list[tuple[str, list[str]]]:
    """``[(mode, names)]``: each of the config's non-default multi-view settings with the missing names it adds to
    the model (those a model built with that setting at its default lacks); the rest are the model's own."""
    found, left = [], set(missing)
    wan = set(config.wan_dict())
    for option in dataclasses.fields(config):
        value = getattr(config, option.name)
        if option.name in wan or option.default is dataclasses.MISSING or value == option.default or not left:
            continue
        try:
            plain = config.replace(**{option.name: option.default})
        except ValueError:  # a setting that cannot return to its default alone
            continue
        with torch.device("meta"):
            keys = set(MultiViewWanTransformer(plain).state_dict())
        names = sorted(left - keys)
        if names:
            found.append((f"{option.name}={value!r}", names))
            left -= set(names)
    return found + ([("this model", sorted(left))] if left else [])


def _shares_reference(model: MultiViewWanTransformer, parsed: ReferenceAdapter | None, loras: Sequence[LoraSpec],
                      lora_reference: bool) -> bool:
    """Whether the reference stream shares the video stream's weights. When the config asks for it and sharing
    cannot be exact, the model's config says ``ref_weights="merged"`` and one INFO line says why: whoever asked for
    the smaller model learns they did not get it."""
    if model.ref_blocks is None or model.config.ref_weights != "shared":
        return False
    ref_keys = {k for k in model.state_dict() if k.startswith("ref_blocks.")}
    why = why_not_shared(ref_keys, parsed, loras, lora_reference)
    if why is None:
        return True
    log.info("ref_weights 'shared' cannot be exact, so the reference stream is a merged copy of the blocks "
             "(ref_weights 'merged', ~1.9x the base model's parameters): %s", why)
    model.config = model.config.replace(ref_weights="merged")
    return False


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
    parsed = read_adapter(adapter) if adapter is not None else None
    rule = ScaleRule.from_config(config, lora_scale)
    if parsed is not None and parsed.reference_loras and config.ref_mode != "dual_stream":
        raise AdapterError(f"a reference-stream LoRA needs ref_mode='dual_stream', got {config.ref_mode!r}")

    with torch.device("meta"):
        model = MultiViewWanTransformer(config)
    shared = _shares_reference(model, parsed, loras, lora_reference)
    if weights_file is not None:
        state = _without_ignored(read_single_file_transformer(weights_file))
    else:
        state = _base_state(transformer_weight_files(transformer_dir))
    base_keys = _check_base_keys(model, state)
    # full tensors first (the base, its copy as a merged reference stream, the config's, the adapter's), then every
    # delta on top: LoRA deltas commute, replacements do not
    if model.ref_blocks is not None and not shared:
        state.update({f"ref_{k}": v.clone() for k, v in state.items() if k.startswith("blocks.")})
    state.update(_config_tensors(config))
    if parsed is not None:
        _apply_full_tensors(model, state, parsed)
    _require_complete(model, state, Path(adapter) if adapter is not None else None, shared)
    video_lora = [LoraSpec(parsed.video_lora)] if parsed is not None and parsed.video_lora is not None else []
    unmerged = {}
    if parsed is not None:
        deltas, used = adapter_deltas(parsed, rule, {k: v.shape for k, v in model.state_dict().items()},
                                      config.num_layers)
        # a weight the reference stream shares is no entry of the state: its pair stays unmerged
        unmerged = {target: delta for target, delta in deltas.items() if f"{target}.weight" not in state}
        merge_deltas(state, {target: delta for target, delta in deltas.items() if target not in unmerged})
        _log_adapter(adapter, parsed, rule, used, base_keys, len(unmerged))
    merge_base_loras(state, [*video_lora, *loras])
    if model.ref_blocks is not None and lora_reference:
        if shared:
            _merge_base_loras_into_own(model, state, loras)
        else:
            merge_base_loras(state, loras, prefix="ref_")
    wrap_low_rank(model, {target: (delta.rank, delta.scale) for target, delta in unmerged.items()})
    for target, delta in unmerged.items():
        state[f"{target}.lora_A.weight"], state[f"{target}.lora_B.weight"] = delta.down, delta.up
    for key, value in state.items():
        if value.is_floating_point():
            value = value.to(torch.float32 if any(part in key for part in _FP32_PARAMS) else dtype)
        state[key] = value.to(device)
    own = {k for k in state if k.startswith("ref_blocks.")}
    if shared:  # each shared tensor under its reference name too (the same tensor, no copy), for the strict load
        state.update({k: state[k.removeprefix("ref_")] for k in model.state_dict()
                      if k.startswith("ref_blocks.") and k not in own})
    model.load_state_dict(state, strict=True, assign=True)
    if shared:
        share_reference_stream(model, own)
    return model.eval().requires_grad_(False)
