"""Load a denoiser (one expert) from a diffusers Wan checkpoint (or a single-file transformer), with base-model
LoRAs merged into the video stream and an optional reference-stream adapter merged into the reference stream."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .config import MvgenConfig
from .denoiser import MultiViewWanTransformer
from .files import CheckpointError, check_checkpoint_component, load_safetensors, read_json, safetensors_files
from .base_lora import LoraSpec, merge_base_loras
from .lora import AdapterError, ReferenceAdapter, merge_into_reference_stream, read_adapter
from .single_file import read_single_file_transformer

# tensors of diffusers checkpoints that Wan2.1 does not use (diffusers ignores them too)
_IGNORED_BASE_KEYS = ("norm_added_q",)
# kept in float32 whatever the compute dtype, as diffusers' Wan does
_FP32_PARAMS = ("scale_shift_table", "condition_embedder.time_embedder", "norm1", "norm2", "norm3", "view_logit_scales")


def find_transformer_dir(path: str | Path, folder: str = "transformer") -> Path:
    """``path/folder`` (a diffusers pipeline: ``transformer``, Wan2.2's ``transformer_2``) or, for the first
    expert, ``path`` itself when it is a transformer dir."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    for candidate in (path / folder, path) if folder == "transformer" else (path / folder,):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"{path} is neither a diffusers Wan pipeline ({folder}/config.json) nor a transformer dir")


def transformer_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a transformer dir (the shards of an index, or every *.safetensors), each
    checked to be sound safetensors before anything loads it."""
    return safetensors_files(folder, CheckpointError)


def _base_state(files: list[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for file in files:
        state.update(load_safetensors(file, CheckpointError))
    return _without_ignored(state)


def _without_ignored(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not any(part in k for part in _IGNORED_BASE_KEYS)}


def _check_base_keys(model: MultiViewWanTransformer, state: dict[str, torch.Tensor]) -> None:
    expected = {k for k in model.state_dict() if not k.startswith(("ref_blocks.", "ref_patch_embedding.", "view_logit_scales"))}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"transformer weights do not match a Wan {model.config.task} model of this config: "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    shapes = model.state_dict()
    wrong = [f"{k} {list(state[k].shape)} vs {list(shapes[k].shape)}" for k in expected if state[k].shape != shapes[k].shape]
    if wrong:
        raise CheckpointError(f"transformer weights with the wrong shape (file vs config): {sorted(wrong)[:6]}")


def _apply_adapter_extras(model, state, adapter: ReferenceAdapter, config: MvgenConfig) -> None:
    extras = adapter.extras
    if "view_logit_scales" in extras:
        weights = extras["view_logit_scales"].float().reshape(-1)
        if weights.numel() != config.max_references:
            raise AdapterError(f"adapter view_logit_scales has {weights.numel()} entries, expected {config.max_references}")
        state["view_logit_scales"] = weights
    if "ref_patch_embedding.weight" in extras:
        weight = extras["ref_patch_embedding.weight"]
        if weight.ndim != 5 or weight.shape[0] != config.inner_dim or weight.shape[1] not in (16, 36):
            raise AdapterError(
                f"ref_patch_embedding.weight must be [{config.inner_dim}, 16 or 36, *patch], got {list(weight.shape)}"
            )
        with torch.device("meta"):
            model.ref_patch_embedding = torch.nn.Conv3d(
                weight.shape[1], config.inner_dim, kernel_size=config.patch_size, stride=config.patch_size
            )
        state["ref_patch_embedding.weight"] = weight
        state["ref_patch_embedding.bias"] = extras.get("ref_patch_embedding.bias", torch.zeros(config.inner_dim))


def load_denoiser(
    path: str | Path,
    adapter: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    lora_scale: float | None = None,
    *,
    folder: str = "transformer",
    weights_file: str | Path | None = None,
    loras: Sequence[LoraSpec] = (),
    lora_reference: bool = False,
    **config_overrides,
) -> MultiViewWanTransformer:
    """Build one denoiser from a diffusers pipeline dir (its ``folder``: ``transformer``, or Wan2.2's
    ``transformer_2``) or a transformer dir.

    ``weights_file`` replaces the folder's weights by a single-file transformer (original Wan / ComfyUI key
    names, converted by diffusers); the folder still gives the config. ``loras`` (base-model LoRAs, any
    spelling diffusers reads) merge into the video stream, in order, and into the reference stream too when
    ``lora_reference`` (MVI2V's reference stream starts as a copy of the base). ``adapter`` (a LoRA
    ``.safetensors`` or a PEFT dir) then defines the reference stream: ``W_ref = W + scale * B @ A`` merged
    once here, scale = alpha/rank from the file (or ``lora_scale``). Without an adapter the reference stream
    is a copy of the base weights (MVI2V). ``mvgen_config.json`` beside the adapter (or in ``path``) sets the
    multi-view options; keyword overrides win over both.
    """
    transformer_dir = find_transformer_dir(path, folder)
    parsed = read_adapter(adapter) if adapter is not None else None
    config = denoiser_config(path, adapter, folder, **config_overrides)
    if parsed is not None and parsed.loras and config.ref_mode != "dual_stream":
        raise AdapterError(f"a reference-stream LoRA needs ref_mode='dual_stream', got {config.ref_mode!r}")

    with torch.device("meta"):
        model = MultiViewWanTransformer(config)
    if weights_file is not None:
        state = _without_ignored(read_single_file_transformer(weights_file))
    else:
        state = _base_state(transformer_weight_files(transformer_dir))
    _check_base_keys(model, state)
    if model.ref_blocks is not None:
        state.update({f"ref_{k}": v.clone() for k, v in state.items() if k.startswith("blocks.")})
    merge_base_loras(state, loras)
    if model.ref_blocks is not None and lora_reference:
        merge_base_loras(state, loras, prefix="ref_")
    state["view_logit_scales"] = torch.tensor(
        config.view_logit_scales if config.view_logit_scales is not None else (1.0,) * config.max_references
    )
    if parsed is not None:
        _apply_adapter_extras(model, state, parsed, config)
        merge_into_reference_stream(state, parsed, config.num_layers, lora_scale)
    for key, value in state.items():
        if value.is_floating_point():
            value = value.to(torch.float32 if any(part in key for part in _FP32_PARAMS) else dtype)
        state[key] = value.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def mvgen_config_path(path: str | Path, adapter: str | Path | None) -> Path:
    """``mvgen_config.json`` beside the adapter when it has one, else in the checkpoint directory."""
    if adapter is not None:
        adapter = Path(adapter)
        beside = (adapter if adapter.is_dir() else adapter.parent) / "mvgen_config.json"
        if beside.is_file():
            return beside
    return Path(path) / "mvgen_config.json"


def denoiser_config(path: str | Path, adapter: str | Path | None = None, folder: str = "transformer",
                    **config_overrides) -> MvgenConfig:
    """The denoiser's config from the checkpoint's JSON files alone (no weights read)."""
    transformer_dir = find_transformer_dir(path, folder)
    return MvgenConfig.from_files(transformer_dir / "config.json", mvgen_config_path(path, adapter), **config_overrides)


def check_component(folder: Path, weights: bool = True) -> None:
    """Refuse a component folder whose config or safetensors are not what they claim (one line, before a
    diffusers/transformers loader turns it into a traceback); see ``files.check_checkpoint_component``."""
    check_checkpoint_component(folder, CheckpointError, weights)


def read_checkpoint_json(path: Path, what: str = "JSON file") -> dict:
    return read_json(path, CheckpointError, what)
