"""Single-file Wan transformer checkpoints: one ``.safetensors`` in the original Wan key names
(``blocks.0.self_attn.q.weight``, ``head.modulation``, ...), often under ComfyUI's ``model.diffusion_model.``
or ``diffusion_model.`` prefix, read into the diffusers names the loader expects.

The renaming is diffusers' own (``convert_wan_transformer_to_diffusers``, the function behind
``WanTransformer3DModel.from_single_file``), not a second copy of its table. What is added here is what that
converter leaves to its caller:

- it strips ``model.diffusion_model.`` but not ``diffusion_model.``, and ``infer_diffusers_model_type`` does
  not recognise the latter, so both prefixes are stripped here before either sees the keys;
- it renames every key it is given and passes a key it does not know through under its (partly rewritten)
  name, and ``from_single_file`` then only logs a warning and drops it (a weight the model lacks); here every
  converted name must be one a ``WanTransformer3DModel`` has, or the file is refused naming the key;
- two keys that convert to the same name would overwrite one another silently; refused too;
- FP8 files (ComfyUI, ComfyUI-WanVideoWrapper, LightX2V): their weights kept in float8_e4m3fn as stored, their scales
  read per output channel and renamed with the weights, the scale keys dropped, an unknown scale layout refused
  (``engine.backbones.wan.fp8_files``); the loader decides per tensor whether it stays FP8 or is dequantised.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ...errors import CheckpointError
from ...files import load_pickled_tensors
from .fp8_files import split_scales
from .sharded_files import read_weights

# ComfyUI's prefixes for the diffusion model inside a checkpoint, longest first
COMFYUI_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# torch.save / pickle suffixes: loading one can run arbitrary code, so they are refused by name
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_SUPPORTED = (
    "supported: one .safetensors file of a Wan2.1/Wan2.2 text-to-video or image-to-video transformer in the "
    "original Wan key names (optionally prefixed 'model.diffusion_model.' or 'diffusion_model.'), or a diffusers "
    "checkpoint directory"
)
# Wan's ``WanModel`` keeps its RoPE table as a buffer, so a torch.save of its whole state (Phantom-Wan-1.3B's .pth)
# holds it, a complex tensor computed from the config rather than learned: the converter leaves it out
_COMPUTED_BUFFERS = ("freqs",)
# the variants diffusers recognises by one key and that this engine does not serve
_UNSERVED = {"wan_vace": "Wan VACE", "wan_animate": "Wan Animate"}


def is_single_file(path: str | Path) -> bool:
    """Whether ``path`` names a single weight file rather than a (diffusers) checkpoint directory.

    A pickle suffix counts too, and so does a ``.safetensors`` path that does not exist: the loader then
    sends it to ``read_single_file_transformer``, whose refusal says what is wrong with that file."""
    path = Path(path)
    if path.is_dir():
        return False
    return path.is_file() or path.suffix.lower() in (".safetensors", *_PICKLE_SUFFIXES)


def read_single_file_transformer(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the diffusers-named state dict (``WanTransformer3DModel`` names, tensors as stored: an FP8 file's weights
    in float8_e4m3fn), the scale [out] float32 of each FP8 weight by the same names (empty for a 16/32-bit file))
    of a single-file Wan transformer; ``CheckpointError`` naming the file for anything else."""
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: a {path.suffix} file is a pickle; pickles are never loaded (convert it: "
                              f"mvgen convert wan-pth {path.name} OUT.safetensors); {_SUPPORTED}")
    prefix, state = _strip_prefix(path, read_weights(path))  # one file, or an index of shards
    state, scales = split_scales(path, state)
    converted = _checked_conversion(path, prefix, state)
    # the converter renames key by key: each scale takes its weight's new name
    return converted, {_renamed(key, state): scale for key, scale in scales.items()}


def convert_pickled_transformer(source: str | Path, out: str | Path) -> Path:
    """``mvgen convert wan-pth``: a Wan transformer in the original names saved with torch.save (Phantom-Wan-1.3B's
    ``.pth``) -> one ``.safetensors`` file for ``--transformer``. The pickle is read by the one pickle reader
    (``torch.load(weights_only=True)``, memory-mapped) and checked as the single-file loader checks a file (a Wan
    T2V/I2V transformer, every key one of its parameters) before anything is written; the tensors are then written
    as loaded (never copied), under their original names."""
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the converted file's name must end in .safetensors")
    if out.exists():
        raise CheckpointError(f"{out}: exists; the converter writes a new file")
    state = load_pickled_tensors(source, CheckpointError, "a Wan transformer checkpoint holds its tensors only")
    prefix, state = _strip_prefix(source, state)
    state = {key: tensor for key, tensor in state.items() if key not in _COMPUTED_BUFFERS}
    _checked_conversion(source, prefix, state)
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(out), metadata={"format": "pt"})
    return out


def _checked_conversion(path: Path, prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (original names, prefix stripped) in diffusers' names, refused unless it is a served Wan transformer
    whose every key converts to one of its parameters: the loader's checks, and the converter's before it writes."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    _check_family(path, state)
    converted = convert_wan_transformer_to_diffusers(dict(state))  # it pops every key of the dict it is given
    _check_converted(path, prefix, state, converted)
    return converted


def _renamed(key: str, state: dict[str, torch.Tensor]) -> str:
    """diffusers' converter's name for one key of ``state``."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return next(iter(convert_wan_transformer_to_diffusers({key: state[key]})))


def _strip_prefix(path: Path, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """The ComfyUI prefix the transformer's keys carry ('' for none) and the state without it. The prefix is
    the one ``head.modulation`` (every Wan transformer has it) carries; keys without it are kept as they are,
    so that keys of other models in the file (a ComfyUI all-in-one checkpoint's VAE, text encoder) are named
    as not belonging to a Wan transformer."""
    prefix = next((p for p in COMFYUI_PREFIXES if f"{p}head.modulation" in state), "")
    if not prefix:
        return "", state
    stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    if len(stripped) < len(state):
        both = sorted(k for k in state if not k.startswith(prefix) and prefix + k in state)
        raise CheckpointError(f"{path}: holds these tensors both with and without the prefix {prefix!r}: "
                              f"{_few(both)}")
    return prefix, stripped


def _check_family(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse what is not a Wan T2V/I2V transformer, with diffusers' own markers for each Wan family."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    for family, name in _UNSERVED.items():
        if CHECKPOINT_KEY_NAMES[family] in state:
            raise CheckpointError(f"{path}: a {name} transformer (it has {CHECKPOINT_KEY_NAMES[family]!r}), which "
                                  f"this engine does not serve; {_SUPPORTED}")
    if "head.modulation" not in state:
        raise CheckpointError(f"{path}: {_not_wan(state)}; {_SUPPORTED}")
    patch = state.get("patch_embedding.weight")
    if patch is None or patch.ndim != 5:  # the key infer_diffusers_model_type reads to tell Wan models apart
        raise CheckpointError(f"{path}: not a Wan transformer (no 5-D 'patch_embedding.weight'); {_SUPPORTED}")
    model_type = infer_diffusers_model_type(state)
    if not model_type.startswith("wan-"):
        raise CheckpointError(f"{path}: diffusers recognises this file as {model_type!r}, not a Wan transformer; "
                              f"{_SUPPORTED}")


def _not_wan(state: dict[str, torch.Tensor]) -> str:
    """What a file without Wan's ``head.modulation`` is, where that is recognisable."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    if CHECKPOINT_KEY_NAMES["wan_vae"] in state:
        return "a Wan VAE, not a Wan transformer"
    if "condition_embedder.time_proj.weight" in state and "scale_shift_table" in state:
        # diffusers' converter would swap such a file's norm2/norm3; its folder has the config.json to load it
        return "a Wan transformer in diffusers names: pass the diffusers folder holding it and its config.json"
    return "not a Wan transformer (no 'head.modulation')"


def _check_converted(path: Path, prefix: str, state: dict, converted: dict) -> None:
    """Every converted name is a ``WanTransformer3DModel`` parameter, and no two keys became one."""
    if len(converted) < len(state):
        names: dict[str, list[str]] = {}
        for key in state:
            names.setdefault(_renamed(key, state), []).append(prefix + key)
        merged = [group for group in names.values() if len(group) > 1]
        raise CheckpointError(f"{path}: keys that diffusers' Wan converter maps to one name: {merged[:3]}")
    known = _wan_parameter_patterns()
    unknown = {_block_pattern(k) for k in converted} - known
    if unknown:
        foreign = sorted(prefix + k for k in state if _block_pattern(_renamed(k, state)) in unknown)
        raise CheckpointError(f"{path}: {len(foreign)} key(s) that are not part of a Wan T2V/I2V transformer "
                              f"(diffusers' converter does not map them to one): {_few(foreign)}; {_SUPPORTED}")


def _wan_parameter_patterns() -> set[str]:
    """Every parameter name of a diffusers ``WanTransformer3DModel`` with all optional parts (image
    conditioning, cross-attention norm, q/k norm), block index replaced by ``*``; built on the meta device,
    so nothing is allocated."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(num_layers=1, image_dim=1280, added_kv_proj_dim=5120, cross_attn_norm=True,
                                      qk_norm="rms_norm_across_heads")
    return {_block_pattern(k) for k in model.state_dict()}


def _block_pattern(key: str) -> str:
    return re.sub(r"^blocks\.\d+\.", "blocks.*.", key)


def _few(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    return f"{keys[:limit]}{f' and {len(keys) - limit} more' if len(keys) > limit else ''}"
