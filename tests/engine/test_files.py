"""Weight and config files that are not what they claim: each refused in one line naming the file and the
problem, before safetensors, diffusers or transformers see it. The oracle for sound files is safetensors'
own writer and reader."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.files import (MAX_JSON_BYTES, MAX_SAFETENSORS_HEADER, check_checkpoint_component, check_safetensors,
                          index_shards, load_safetensors, read_json, safetensors_files)
from engine.errors import AdapterError, CheckpointError

ERRORS = [CheckpointError, AdapterError]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.weight": torch.randn(6, 4, generator=gen),
        "blocks.0.bias": torch.randn(6, generator=gen).to(torch.bfloat16),
        "scale": torch.randn((), generator=gen).to(torch.float16),
        "empty": torch.zeros(0, 3),
    }


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(0), path)
    return path


def _split(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _write(path, header: dict, payload: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


def _refused(call, error_cls, *words):
    with pytest.raises(error_cls) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_sound_file_passes_and_loads_as_safetensors_does(good):
    header = check_safetensors(good, CheckpointError)
    assert sorted(header) == sorted(_tensors(0)) and header["blocks.0.bias"]["dtype"] == "BF16"
    loaded, expected = load_safetensors(good, CheckpointError), load_file(good)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def _truncated(path):
    path.write_bytes(path.read_bytes()[:-10])


def _garbage_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = bytes(range(200, 232))  # the JSON header's first bytes: not UTF-8, not JSON
    path.write_bytes(bytes(data))


def _length_past_the_file(path):
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data)) + data[8:])


def _offsets_out_of_range(path):
    header, payload = _split(path)
    begin, end = header["blocks.0.weight"]["data_offsets"]
    header["blocks.0.weight"]["data_offsets"] = [begin + 1000, end + 1000]
    _write(path, header, payload)


def _offsets_wrong_size(path):
    header, payload = _split(path)
    header["blocks.0.weight"]["shape"] = [6, 5]
    _write(path, header, payload)


def _offsets_overlap(path):
    header, payload = _split(path)
    header["blocks.0.weight"]["data_offsets"] = header["blocks.0.bias"]["data_offsets"]
    header["blocks.0.weight"]["shape"], header["blocks.0.weight"]["dtype"] = [6], "BF16"
    _write(path, header, payload)


def _trailing_bytes(path):
    path.write_bytes(path.read_bytes() + b"\0" * 7)


def _missing_field(path):
    header, payload = _split(path)
    del header["scale"]["dtype"]
    _write(path, header, payload)


def _unknown_dtype(path):
    header, payload = _split(path)
    header["scale"]["dtype"] = "F128"
    _write(path, header, payload)


def _header_not_object(path):
    raw = b"[1, 2, 3]"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def _pickle(path):
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=4))


def _torch_zip(path):
    torch.save(_tensors(1), path)


def _lfs_pointer(path):
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123456789\n")


def _empty(path):
    path.write_bytes(b"")


def _five_bytes(path):
    path.write_bytes(b"\x01\x02\x03\x04\x05")


def _directory(path):
    path.unlink()
    path.mkdir()


def _missing(path):
    path.unlink()


BAD_SAFETENSORS = {
    "truncated": (_truncated, "10 bytes missing"),
    "header garbage": (_garbage_header, "header is not JSON"),
    "header length past the file": (_length_past_the_file, "header length"),
    "offsets out of range": (_offsets_out_of_range, "truncated: tensor 'blocks.0.weight' ends at byte"),
    "offsets disagree with dtype x shape": (_offsets_wrong_size, "'blocks.0.weight' (F32 [6, 5]) needs 120 bytes"),
    "offsets overlap": (_offsets_overlap, "overlapping or gapped data_offsets"),
    "bytes after the last tensor": (_trailing_bytes, "7 bytes after the last tensor"),
    "entry without dtype": (_missing_field, "'scale' lacks dtype/shape/data_offsets"),
    "unknown dtype": (_unknown_dtype, "unknown dtype 'F128'"),
    "header not an object": (_header_not_object, "header is a JSON array"),
    "pickle": (_pickle, "is a pickle, not safetensors; pickles are never loaded"),
    "torch.save zip": (_torch_zip, "is a zip archive (torch.save / pickle), not safetensors"),
    "git lfs pointer": (_lfs_pointer, "Git LFS pointer"),
    "empty file": (_empty, "empty file, not a safetensors file"),
    "five bytes": (_five_bytes, "only 5 bytes"),
    "directory": (_directory, "is a directory, expected a safetensors file"),
    "missing": (_missing, "safetensors file not found"),
}


@pytest.mark.parametrize("error_cls", ERRORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", BAD_SAFETENSORS)
def test_bad_safetensors_refused_in_one_line_naming_the_file(good, case, error_cls):
    corrupt, words = BAD_SAFETENSORS[case]
    corrupt(good)
    message = _refused(lambda: check_safetensors(good, error_cls), error_cls, words)
    assert message.startswith(f"{good}: ")
    _refused(lambda: load_safetensors(good, error_cls), error_cls, str(good), words)


def test_header_length_over_the_cap(tmp_path):
    path = tmp_path / "huge.safetensors"
    with path.open("wb") as handle:  # a sparse file larger than the header it claims: nothing is written
        handle.write(struct.pack("<Q", MAX_SAFETENSORS_HEADER + 1))
        handle.truncate(MAX_SAFETENSORS_HEADER + 100)
    _refused(lambda: check_safetensors(path, CheckpointError), CheckpointError, str(path),
             f"exceeds the {MAX_SAFETENSORS_HEADER}-byte limit")


# ---- JSON --------------------------------------------------------------------------------------------------
BAD_JSON = {
    "invalid": (b'{"num_layers": 2,', "not valid JSON (Expecting property name enclosed in double quotes at line 1"),
    "array": (b"[1, 2]", "expected a JSON object, got a JSON array"),
    "string": (b'"config"', "expected a JSON object, got a JSON string"),
    "binary": (bytes(range(128, 256)), "not UTF-8 text, so not JSON (byte 0x80 at offset 0)"),
    "nested too deeply": (b"[" * 200_000, "JSON nested too deeply"),
    "empty": (b"", "not valid JSON (Expecting value at line 1 column 1)"),
}


@pytest.mark.parametrize("error_cls", ERRORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", BAD_JSON)
def test_bad_json_refused_in_one_line(tmp_path, case, error_cls):
    content, words = BAD_JSON[case]
    path = tmp_path / "config.json"
    path.write_bytes(content)
    message = _refused(lambda: read_json(path, error_cls, "transformer config"), error_cls, words)
    assert message.startswith(f"{path}: ")


def test_json_missing_directory_and_too_large(tmp_path):
    path = tmp_path / "config.json"
    _refused(lambda: read_json(path, CheckpointError, "VAE config"), CheckpointError, f"{path}: VAE config not found")
    path.mkdir()
    _refused(lambda: read_json(path, CheckpointError), CheckpointError, "is a directory")
    big = tmp_path / "big.json"
    with big.open("wb") as handle:
        handle.truncate(MAX_JSON_BYTES + 1)
    _refused(lambda: read_json(big, CheckpointError), CheckpointError, str(big),
             f"more than the {MAX_JSON_BYTES}-byte limit")
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    assert read_json(good, CheckpointError) == {"a": [1, 2]}


# ---- folders -----------------------------------------------------------------------------------------------
def _sharded(folder, index: dict | None = None):
    folder.mkdir(exist_ok=True)
    tensors = _tensors(2)
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:2]}, folder / "part-1.safetensors")
    save_file({k: tensors[k] for k in names[2:]}, folder / "part-2.safetensors")
    weight_map = {k: f"part-{1 + (i >= 2)}.safetensors" for i, k in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index or {"weight_map": weight_map}))
    (folder / "config.json").write_text('{"num_layers": 2}')
    return folder


def test_safetensors_files_follow_the_index(tmp_path):
    folder = _sharded(tmp_path / "transformer")
    assert safetensors_files(folder, CheckpointError) == [folder / "part-1.safetensors", folder / "part-2.safetensors"]
    check_checkpoint_component(folder, CheckpointError)


@pytest.mark.parametrize("weight_map, words", [
    ({"a": "../../etc/passwd"}, "weight_map must name shard files beside the index, got ['../../etc/passwd']"),
    ({"a": "/abs/shard.safetensors"}, "beside the index"),
    ({"a": 3}, "beside the index"),
    ({}, "no 'weight_map' object"),
    ([1], "no 'weight_map' object"),
])
def test_index_names_shards_beside_it(tmp_path, weight_map, words):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    _refused(lambda: index_shards(index, CheckpointError), CheckpointError, str(index), words)


def test_folder_problems(tmp_path):
    folder = _sharded(tmp_path / "transformer")
    (folder / "part-2.safetensors").unlink()
    _refused(lambda: safetensors_files(folder, CheckpointError), CheckpointError,
             "names shard(s) that are missing: ['part-2.safetensors']")
    (folder / "part-2.safetensors").write_bytes(b"")
    _refused(lambda: safetensors_files(folder, CheckpointError), CheckpointError,
             f"{folder / 'part-2.safetensors'}: empty file")
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "pytorch_model.bin").write_bytes(pickle.dumps({}))
    _refused(lambda: safetensors_files(pickles, AdapterError), AdapterError,
             "no .safetensors weights; found ['pytorch_model.bin'], but pickled weights are never loaded")


def test_component_check_covers_config_weights_and_other_json(tmp_path):
    folder = _sharded(tmp_path / "vae")
    (folder / "config.json").write_text("{")
    _refused(lambda: check_checkpoint_component(folder, CheckpointError), CheckpointError,
             f"{folder / 'config.json'}: not valid JSON")
    (folder / "config.json").unlink()
    _refused(lambda: check_checkpoint_component(folder, CheckpointError), CheckpointError,
             f"{folder / 'config.json'}: component config not found")
    _refused(lambda: check_checkpoint_component(tmp_path / "nope", CheckpointError), CheckpointError,
             "component folder not found")
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    check_checkpoint_component(tokenizer, CheckpointError, weights=False)
    (tokenizer / "special_tokens_map.json").write_text("[")
    _refused(lambda: check_checkpoint_component(tokenizer, CheckpointError, weights=False), CheckpointError,
             "special_tokens_map.json: not valid JSON")
