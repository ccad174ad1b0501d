"""Sharded single-file Wan transformers: several ``.safetensors`` shards in the original Wan key names and their
``*.safetensors.index.json`` (``diffusion_pytorch_model-00001-of-00006.safetensors`` + its index, Wan2.1-14B's
layout, or the authors' own file names, as Phantom-Wan-14B ships), read as the one state dict that
``single_file.read_single_file_transformer`` converts.

The shards are read one after another into one dict of the tensors ``safetensors`` returns (no tensor is copied,
concatenated or converted here), so the merged state is the model once, whatever the number of shards. The index
is the contract: every shard it names is read, each holds exactly the keys the index gives it, and a shard name
that leaves the index's folder is refused.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...errors import CheckpointError
from ...files import load_safetensors, read_json

INDEX_SUFFIX = ".safetensors.index.json"


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` names a shard index or a folder of shards (rather than one weight file)."""
    path = Path(path)
    return path.is_dir() or path.name.endswith(INDEX_SUFFIX)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one ``.safetensors`` file, or of every shard of an index (``path`` the index or its folder)."""
    return read_sharded(path) if is_sharded(path) else load_safetensors(path, CheckpointError)


def index_file(path: str | Path) -> Path:
    """The index ``path`` names, or the one index in the folder ``path``."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({[f.name for f in found]})"
        raise CheckpointError(f"{path}: a folder of transformer shards needs exactly one *{INDEX_SUFFIX}, found "
                              f"{what}")
    return found[0]


def read_sharded(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the shards an index names, checked against the index (``CheckpointError`` naming the file)."""
    index = index_file(path)
    weight_map = read_json(index, CheckpointError, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: no 'weight_map' of tensor names to shard file names")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{index}: shard {shard!r} is not a file name beside the index")
        tensors = load_safetensors(index.parent / shard, CheckpointError)
        listed = {key for key, name in weight_map.items() if name == shard}
        if set(tensors) != listed:
            extra, missing = sorted(set(tensors) - listed), sorted(listed - set(tensors))
            raise CheckpointError(f"{index.parent / shard}: does not hold what {index.name} lists for it "
                                  f"(not listed: {extra[:4]}; missing: {missing[:4]})")
        state.update(tensors)
    return state
