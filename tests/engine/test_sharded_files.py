"""Sharded single-file Wan transformers (original Wan names, several safetensors shards and their index, as
Wan2.1-14B and Phantom-Wan-14B ship): read through the single-file conversion (diffusers' converter is the
oracle) as one state, the index checked, and the model held once in memory while read."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from engine.backbones.wan.single_file import read_single_file_transformer
from engine.errors import CheckpointError
from engine.tiny import write_original_shards

from .conftest import make_wan


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A random T2V transformer (diffusers names) and its original-name shards' index."""
    model = make_wan(seed=5, in_channels=16, image_dim=None, added_kv_proj_dim=None)
    index = write_original_shards(tmp_path_factory.mktemp("shards") / "phantom", model.state_dict(), 4,
                                  stem="Phantom_Wan_tiny")
    return model.state_dict(), index


@pytest.mark.parametrize("by", ["index", "folder"])
def test_shards_convert_to_the_diffusers_state(sharded, by):
    state, index = sharded
    got, _ = read_single_file_transformer(index if by == "index" else index.parent)
    assert got.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(got[key], value), key


def _copy(index, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for f in index.parent.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder / index.name


def _edit_index(index, change):
    data = json.loads(index.read_text())
    change(data["weight_map"])
    index.write_text(json.dumps(data))


def test_an_index_that_does_not_match_its_shards_is_refused(sharded, tmp_path):
    index = _copy(sharded[1], tmp_path)
    key = next(iter(json.loads(index.read_text())["weight_map"]))
    _edit_index(index, lambda m: m.pop(key))
    with pytest.raises(CheckpointError, match=rf"does not hold what Phantom_Wan_tiny.safetensors.index.json lists "
                                              rf"for it \(not listed: \['{key}'\]; missing: \[\]\)"):
        read_single_file_transformer(index)
    _edit_index(index, lambda m: m.update({key: "Phantom_Wan_tiny-00001-of-00004.safetensors",
                                           "blocks.0.extra.weight": "Phantom_Wan_tiny-00001-of-00004.safetensors"}))
    with pytest.raises(CheckpointError, match=r"missing: \['blocks.0.extra.weight'\]"):
        read_single_file_transformer(index)


def test_a_shard_outside_the_index_folder_is_refused(sharded, tmp_path):
    index = _copy(sharded[1], tmp_path)
    _edit_index(index, lambda m: m.update({k: "../" + v for k, v in m.items()}))
    with pytest.raises(CheckpointError, match=r"shard '\.\./Phantom_Wan_tiny-0000\d-of-00004.safetensors' is not a "
                                              r"file name beside the index"):
        read_single_file_transformer(index)


def test_a_folder_needs_one_index(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"needs exactly one \*\.safetensors\.index\.json, found no"):
        read_single_file_transformer(tmp_path)


_PEAK = textwrap.dedent("""
    import sys
    from engine.backbones.wan.single_file import read_single_file_transformer, _wan_parameter_patterns
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # imported before measuring
    _wan_parameter_patterns()

    def peak_kib():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))

    before = peak_kib()
    state, _ = read_single_file_transformer(sys.argv[1])
    touched = sum(float(t.sum()) for t in state.values())  # every page read
    print(peak_kib() - before, sum(t.numel() * t.element_size() for t in state.values()) // 1024)
""")


def test_reading_shards_holds_the_model_once(tmp_path):
    """The peak resident memory grows by the model's size, not twice it: shards are mapped and merged by
    reference, never concatenated or copied."""
    model = make_wan(seed=6, in_channels=16, image_dim=None, added_kv_proj_dim=None, num_attention_heads=4,
                     attention_head_dim=64, ffn_dim=1024, num_layers=12, text_dim=32)
    index = write_original_shards(tmp_path / "big", model.state_dict(), 6)
    del model
    out = subprocess.run([sys.executable, "-c", _PEAK, str(index)], capture_output=True, text=True, check=True)
    grown, size = map(int, out.stdout.split())
    # measured 1.03x of a 50 MiB model; with a copy of each tensor (clone) it would be about 2x
    assert grown < 1.3 * size, (grown, size)
