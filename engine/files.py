"""The one place weight and config files are opened: each is checked to be what its name says first.

safetensors, diffusers and transformers turn a truncated shard, a pickle renamed ``.safetensors`` or a
half-written ``config.json`` into a traceback from deep inside their loaders. The checks here read only a
file's size, its first bytes and its header, so a checkpoint's files can all be checked before any loader
sees them; each problem is one line ``"{path}: {problem}"`` in the caller's error class
(``CheckpointError`` or ``lora.AdapterError``), which the CLI and the server report as the user's mistake.
"""
from __future__ import annotations

import contextlib
import json
import math
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

# safetensors' own ceiling on the JSON header (its Rust loader refuses larger ones)
MAX_SAFETENSORS_HEADER = 100_000_000
# config, index and tokenizer JSON of real checkpoints are at most tens of MB (umT5's tokenizer.json: 16 MB)
MAX_JSON_BYTES = 64 << 20
# bits per element of every dtype the safetensors format names (sub-byte float formats included)
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
# first bytes of files that are often renamed .safetensors by mistake, and what they are
_FOREIGN_MAGIC = (
    (b"\x80", "is a pickle, not safetensors; pickles are never loaded (convert it to safetensors)"),
    (b"PK\x03\x04", "is a zip archive (torch.save / pickle), not safetensors; pickles are never loaded "
                    "(convert it to safetensors)"),
    (b"version https://git-lfs", "is a Git LFS pointer, not the weights (fetch them: git lfs pull)"),
    (b"GGUF", "is a GGUF file, not safetensors"),
    (b"<", "is HTML or XML text, not safetensors (a failed download?)"),
)


def check_file(path: str | Path, error_cls: type[ValueError], what: str = "file") -> int:
    """The size in bytes of ``path``, which must be an existing regular file."""
    path = Path(path)
    if not path.exists():
        raise error_cls(f"{path}: {what} not found")
    if path.is_dir():
        raise error_cls(f"{path}: is a directory, expected a {what}")
    if not path.is_file():
        raise error_cls(f"{path}: not a regular file, expected a {what}")
    return path.stat().st_size


def check_safetensors(path: str | Path, error_cls: type[ValueError]) -> dict:
    """The header (``{name: {dtype, shape, data_offsets}}``, ``__metadata__`` dropped) of a safetensors file
    whose structure is sound: a sane header length, a JSON header whose tensors tile the data section exactly.
    Reads the header only."""
    path = Path(path)
    size = check_file(path, error_cls, "safetensors file")
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if size < 8:
                _refuse_foreign(path, head, error_cls)
                raise error_cls(f"{path}: {'empty file' if size == 0 else f'only {size} bytes'}, "
                                f"not a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8 or length > MAX_SAFETENSORS_HEADER:
                _refuse_foreign(path, head + handle.read(32), error_cls)
                limit = "the file" if length > size - 8 else f"the {MAX_SAFETENSORS_HEADER}-byte limit"
                raise error_cls(f"{path}: not a safetensors file (its header length {length} exceeds {limit}; "
                                f"file size {size} bytes)")
            raw = handle.read(length)
    except OSError as error:  # permissions, I/O errors: the user's file system, not a bug
        raise error_cls(f"{path}: cannot read ({error.strerror or error})") from None
    header = _parse_header(path, raw, error_cls)
    _check_layout(path, header, size - 8 - length, error_cls)
    return header


def load_safetensors(path: str | Path, error_cls: type[ValueError]) -> dict[str, torch.Tensor]:
    """Every tensor of a checked safetensors file, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path, error_cls)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:  # e.g. the file changed or became unreadable since the check
        raise error_cls(f"{path}: cannot read safetensors ({error})") from None


def load_pickled_tensors(path: str | Path, error_cls: type[ValueError], holds: str) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint (a dict of tensors, or one under ``state_dict``) for a converter, the only
    reader of a pickle: ``torch.load(weights_only=True)``, so no code in the file runs, memory-mapped where the file
    is torch's zip format (the weights stay the file's pages, which the kernel can drop and re-read under pressure).
    Anything but tensors is refused in one line; ``holds`` says what the file should hold instead."""
    path = Path(path)
    check_file(path, error_cls, "checkpoint")
    try:
        # torch's zip format (torch.save since 1.6) can be memory-mapped; its legacy format cannot
        found = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise error_cls(f"{path.name}: not a checkpoint of plain tensors (torch.load(weights_only=True) refused "
                        f"it: {_unpickler_reason(error)})") from None
    if isinstance(found, dict) and set(found) == {"state_dict"}:
        found = found["state_dict"]
    if not isinstance(found, dict):
        raise error_cls(f"{path.name}: holds a {type(found).__name__}, expected a dict of tensors")
    others = {str(key): type(value).__name__ for key, value in found.items()
              if not isinstance(key, str) or not isinstance(value, torch.Tensor)}
    if others:
        shown = ", ".join(f"{key!r} ({kind})" for key, kind in sorted(others.items())[:4])
        raise error_cls(f"{path.name}: holds values that are not tensors: {shown}{' ...' if len(others) > 4 else ''}; "
                        f"{holds}")
    return found


def _unpickler_reason(error: Exception) -> str:
    """The line of torch's (multi-line, partly ANSI-coloured) refusal that names what the pickle holds."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    named = [line.removeprefix("WeightsUnpickler error: ") for line in lines if "WeightsUnpickler error" in line]
    # torch goes on to explain how to allowlist the class: advice for trusted files, not for a converter
    return (named or [line for line in lines if line] or [type(error).__name__])[0].split(" Please use")[0]


def read_json(path: str | Path, error_cls: type[ValueError], what: str = "JSON file") -> dict:
    """The JSON object in ``path``; ``what`` names the file's role when it is missing or too large."""
    path = Path(path)
    size = check_file(path, error_cls, what)
    if size > MAX_JSON_BYTES:
        raise error_cls(f"{path}: {size} bytes, more than the {MAX_JSON_BYTES}-byte limit for a {what}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise error_cls(f"{path}: cannot read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise error_cls(f"{path}: not UTF-8 text, so not JSON (byte {error.object[error.start]:#04x} at offset "
                        f"{error.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise error_cls(f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    except RecursionError:
        raise error_cls(f"{path}: JSON nested too deeply to parse") from None
    if not isinstance(value, dict):
        raise error_cls(f"{path}: expected a JSON object, got a JSON {_json_kind(value)}")
    return value


def safetensors_files(folder: str | Path, error_cls: type[ValueError]) -> list[Path]:
    """The weight files of a folder: the shards its ``*.safetensors.index.json`` names, else every
    ``*.safetensors``; each checked. Pickled weights beside them are named in the error, never loaded."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        files = [folder / name for name in index_shards(indexes[0], error_cls)]
        missing = [file.name for file in files if not file.exists()]
        if missing:
            raise error_cls(f"{indexes[0]}: names shard(s) that are missing: {missing}")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        hint = f"; found {pickles}, but pickled weights are never loaded (convert to safetensors)" if pickles else ""
        raise error_cls(f"{folder}: no .safetensors weights{hint}")
    for file in files:
        check_safetensors(file, error_cls)
    return files


def index_shards(index: str | Path, error_cls: type[ValueError]) -> list[str]:
    """The shard file names of a safetensors index (``weight_map`` values), sorted and unique."""
    weight_map = read_json(index, error_cls, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise error_cls(f"{index}: no 'weight_map' object (tensor name -> shard file) in this safetensors index")
    shards = set(weight_map.values())
    # a shard lives beside its index: a path would let the index point anywhere on the machine
    bad = sorted(str(s) for s in shards if not isinstance(s, str) or Path(s).name != s or s in (".", ".."))
    if bad:
        raise error_cls(f"{index}: weight_map must name shard files beside the index, got {bad[:3]}")
    return sorted(shards)


def check_checkpoint_component(folder: str | Path, error_cls: type[ValueError], weights: bool = True) -> None:
    """Check a component folder (``text_encoder/``, ``image_encoder/``, ``vae/``, ``transformer/``) before
    diffusers/transformers load it: its ``config.json`` and safetensors (``weights``), and every other JSON
    file in it (tokenizer and processor folders: ``weights=False``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise error_cls(f"{folder}: component folder not found")
    if weights:
        read_json(folder / "config.json", error_cls, "component config")
        safetensors_files(folder, error_cls)
    for file in sorted(folder.glob("*.json")):
        if file.name != "config.json" or not weights:
            read_json(file, error_cls)


def _parse_header(path: Path, raw: bytes, error_cls: type[ValueError]) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise error_cls(f"{path}: not a safetensors file (its {len(raw)}-byte header is not JSON)") from None
    if not isinstance(header, dict):
        raise error_cls(f"{path}: not a safetensors file (its header is a JSON {_json_kind(header)}, not an object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error_cls(f"{path}: safetensors __metadata__ must map names to strings")
    return header


def _check_layout(path: Path, header: dict, data_bytes: int, error_cls: type[ValueError]) -> None:
    """Every tensor's entry is well formed, its byte range matches dtype x shape, and the ranges tile the
    data section with no gap, overlap or missing tail (the safetensors loader's own rules)."""
    spans = sorted((*_tensor_span(path, name, entry, error_cls), name) for name, entry in header.items())
    last = max(spans, key=lambda span: span[1], default=(0, 0, ""))
    if last[1] > data_bytes:
        raise error_cls(f"{path}: truncated: tensor {last[2]!r} ends at byte {last[1]} of the data, the file holds "
                        f"{data_bytes} ({last[1] - data_bytes} bytes missing)")
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            raise error_cls(f"{path}: tensor {name!r} starts at byte {begin} of the data, expected {end} "
                            f"(overlapping or gapped data_offsets)")
        end = stop
    if end < data_bytes:
        raise error_cls(f"{path}: {data_bytes - end} bytes after the last tensor (corrupt or not this header's data)")


def _tensor_span(path: Path, name: str, entry, error_cls: type[ValueError]) -> tuple[int, int]:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise error_cls(f"{path}: tensor {name!r} lacks dtype/shape/data_offsets in the safetensors header")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise error_cls(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise error_cls(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets) \
            or offsets[0] > offsets[1]:
        raise error_cls(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits != 8 * (offsets[1] - offsets[0]):
        raise error_cls(f"{path}: tensor {name!r} ({dtype} {shape}) needs {math.ceil(bits / 8)} bytes, its "
                        f"data_offsets {offsets} span {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


def _refuse_foreign(path: Path, head: bytes, error_cls: type[ValueError]) -> None:
    for magic, problem in _FOREIGN_MAGIC:
        if head.startswith(magic):
            raise error_cls(f"{path}: {problem}")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


@contextlib.contextmanager
def quiet_hub_progress():
    """Hide transformers'/diffusers' per-file loading bars (restored afterwards); our own bar stays."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _ in was:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in was:
            if enabled:
                module.enable_progress_bar()
