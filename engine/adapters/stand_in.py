"""Stand-In's released LoRA (WeChatCV/Stand-In; Wan2.1-T2V-14B, and a high/low pair for Wan2.2-T2V-A14B) as an
mvgen adapter folder.

Stand-In adds a rank-128 LoRA to every block's self-attention q/k/v that applies to the tokens of one face image
only; the face runs through the video's own blocks at timestep 0, skips the cross-attention, sits at t = -1 and
past the video's h/w token grid, and its K/V is computed once per request. In mvgen's words that is the dual
stream with shared weights, ``isolated``, ``ref_timestep="zero"``, ``ref_rope="past_grid"`` and
``ref_cross_attention=False`` (``STAND_IN_CONFIG``), with the LoRA pairs on ``ref_blocks.N.attn1.to_{q,k,v}``
(applied unmerged on the shared weights, scale 1: Stand-In adds ``up(down(x))`` to the projection).

Two spellings are read:
- the authors' pickled ``.ckpt`` (``blocks.{i}.self_attn.{q,k,v}_loras.{down,up}.weight``, maybe under a
  ``state_dict`` key): read by the one pickle reader (``engine.files.load_pickled_tensors``:
  ``torch.load(weights_only=True)``), and only to convert it (``mvgen convert stand-in``);
- ComfyUI-WanVideoWrapper's (kijai) ``.safetensors``: the same names after a ``diffusion_model.`` prefix.
Anything else in the file (another key, a non-tensor value, a rank other than the expected one, a missing half or
projection) is refused in one line before anything is written.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import AdapterError
from ..files import load_pickled_tensors, load_safetensors
from .lora import few_names

STAND_IN_RANK = 128  # Stand-In's LoRALinearLayer(dim, dim, rank=128)
# Stand-In's projections (its SelfAttention's q/k/v) -> our self-attention linears
PROJECTIONS = {"q": "attn1.to_q", "k": "attn1.to_k", "v": "attn1.to_v"}
HALVES = {"down": "lora_A", "up": "lora_B"}  # Stand-In's LoRALinearLayer halves -> PEFT's
KIJAI_PREFIX = "diffusion_model."
# the denoiser settings that make mvgen's reference stream Stand-In's (written to the adapter's mvgen_config.json)
STAND_IN_CONFIG = {
    "ref_mode": "dual_stream", "ref_weights": "shared", "ref_attention": "isolated", "ref_timestep": "zero",
    "ref_rope": "past_grid", "ref_t_stride": 1, "ref_cross_attention": False, "max_references": 1,
    "lora_convention": "alpha_over_rank",
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_KEY = re.compile(r"^blocks\.(\d+)\.self_attn\.([qkv])_loras\.(down|up)\.weight$")


def read_stand_in(path: str | Path, rank: int = STAND_IN_RANK) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a Stand-In file in Stand-In's names (``blocks.{i}.self_attn.q_loras.down.weight``),
    checked (``check_stand_in``): the authors' ``.ckpt`` or kijai's ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"Stand-In checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        tensors = {key.removeprefix(KIJAI_PREFIX): t for key, t in load_safetensors(path, AdapterError).items()}
    elif path.suffix in PICKLE_SUFFIXES:
        tensors = load_pickled_tensors(path, AdapterError, "a Stand-In checkpoint holds LoRA tensors only")
    else:
        raise AdapterError(f"{path.name}: a Stand-In checkpoint is the authors' .ckpt or kijai's .safetensors, got "
                           f"a {path.suffix or 'suffix-less'} file")
    check_stand_in(tensors, rank, path.name)
    return tensors


def check_stand_in(tensors: dict, rank: int, source: str = "Stand-In checkpoint") -> None:
    """Refuse, in one line, anything but ``blocks.{i}.self_attn.{q,k,v}_loras.{down,up}.weight`` for blocks
    0..N-1, each 2-D floating point, ``down`` [rank, D] and ``up`` [D, rank] with one D throughout."""
    if not tensors:
        raise AdapterError(f"{source}: holds no tensors")
    unexpected = [str(key) for key in tensors if not isinstance(key, str) or not _KEY.match(key)]
    if unexpected:
        raise AdapterError(f"{source}: unexpected key(s) {few_names(unexpected)}; a Stand-In checkpoint holds "
                           "blocks.{i}.self_attn.{q,k,v}_loras.{down,up}.weight only")
    bad = [key for key, t in tensors.items() if t.ndim != 2 or not t.is_floating_point()]
    if bad:
        raise AdapterError(f"{source}: {few_names(bad)} are not 2-D floating-point matrices")
    blocks = 1 + max(int(_KEY.match(key)[1]) for key in tensors)
    missing = [f"blocks.{i}.self_attn.{p}_loras.{half}.weight" for i in range(blocks) for p in PROJECTIONS
               for half in HALVES if f"blocks.{i}.self_attn.{p}_loras.{half}.weight" not in tensors]
    if missing:
        raise AdapterError(f"{source}: missing {few_names(missing)} (every block 0..{blocks - 1} has q, k and v "
                           "LoRAs with a down and an up half)")
    wrong = [f"{key} {list(t.shape)}" for key, t in sorted(tensors.items())
             if t.shape[0 if key.endswith("down.weight") else 1] != rank]
    if wrong:
        raise AdapterError(f"{source}: LoRA rank must be {rank} (down [rank, dim], up [dim, rank]); "
                           f"{few_names(wrong)}")
    widths = {t.shape[1 if key.endswith("down.weight") else 0] for key, t in tensors.items()}
    if len(widths) != 1:
        raise AdapterError(f"{source}: the LoRAs read and write different widths {sorted(widths)}; every Stand-In "
                           "LoRA maps the model width to itself")


def adapter_tensors(stand_in: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stand-In's names -> the adapter format's: ``ref_blocks.{i}.attn1.to_q.lora_A.weight`` (down) and
    ``lora_B`` (up), the reference stream's own LoRA pairs."""
    out = {}
    for key, tensor in stand_in.items():
        block, projection, half = _KEY.match(key).groups()
        out[f"ref_blocks.{block}.{PROJECTIONS[projection]}.{HALVES[half]}.weight"] = tensor.contiguous()
    return out


def write_adapter(stand_in: dict[str, torch.Tensor], out_dir: str | Path, rank: int) -> Path:
    """Write checked Stand-In tensors as an mvgen adapter folder: ``adapter_model.safetensors`` and a
    ``mvgen_config.json`` with ``STAND_IN_CONFIG`` (alpha = rank: scale 1, as Stand-In adds its LoRA unscaled)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdapterError(f"{out} exists and is not an empty directory; the converter writes a new adapter folder")
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(stand_in), out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {**STAND_IN_CONFIG, "lora_rank": rank, "lora_alpha": rank}
    (out / "mvgen_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def convert_stand_in(source: str | Path, out_dir: str | Path, rank: int = STAND_IN_RANK) -> Path:
    """``mvgen convert stand-in``: a Stand-In ``.ckpt`` or kijai ``.safetensors`` -> an adapter folder for
    ``--adapter`` (Wan2.2-T2V-A14B: convert the high file for ``--adapter``, the low one for ``--adapter-2``)."""
    return write_adapter(read_stand_in(source, rank), out_dir, rank)


def is_stand_in_file(path: str | Path) -> bool:
    """Whether ``path`` is a ``.safetensors`` file in Stand-In's (kijai's) key names, read from its header alone:
    such a file is an adapter as it is (``--adapter``), without ``mvgen convert``."""
    from safetensors import safe_open

    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001  not a readable safetensors file: the adapter reader says why
        return False
    return bool(keys) and all(_KEY.match(key.removeprefix(KIJAI_PREFIX)) for key in keys)


def file_config(path: str | Path) -> dict:
    """The ``mvgen_config.json`` values a Stand-In file implies (``write_adapter``'s), its rank read from the header."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        down = next(key for key in f.keys() if key.endswith("down.weight"))
        rank = f.get_slice(down).get_shape()[0]
    return {**STAND_IN_CONFIG, "lora_rank": rank, "lora_alpha": rank}


def read_as_adapter(path: str | Path) -> dict[str, torch.Tensor]:
    """A Stand-In ``.safetensors`` file's tensors in the adapter format's names (checked like the converter's)."""
    return adapter_tensors(read_stand_in(path, file_config(path)["lora_rank"]))
