"""Where a checkpoint's parts are and what its JSON files say: the transformer folder and weight files, the
denoiser's config (with ``mvgen_config.json`` and overrides), checked components. Each family's loader
(``engine.backbones.registry``) starts here."""
from __future__ import annotations

from pathlib import Path


from .adapters.stand_in import file_config, is_stand_in_file
from .config import MvgenConfig
from .files import check_checkpoint_component, read_json, safetensors_files
from .errors import CheckpointError



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
    mvgen_config = mvgen_config_path(path, adapter)
    if adapter is not None and not (Path(adapter).parent / "mvgen_config.json").is_file() \
            and is_stand_in_file(adapter):
        # a Stand-In file alone: the settings `mvgen convert stand-in` would write beside it
        config_overrides = {**file_config(adapter), **config_overrides}
    return MvgenConfig.from_files(transformer_dir / "config.json", mvgen_config, **config_overrides)


def check_component(folder: Path, weights: bool = True) -> None:
    """Refuse a component folder whose config or safetensors are not what they claim (one line, before a
    diffusers/transformers loader turns it into a traceback); see ``files.check_checkpoint_component``."""
    check_checkpoint_component(folder, CheckpointError, weights)


def read_checkpoint_json(path: Path, what: str = "JSON file") -> dict:
    return read_json(path, CheckpointError, what)
