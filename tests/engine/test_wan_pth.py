"""``mvgen convert wan-pth``: a Wan transformer pickled with torch.save in the original names (Phantom-Wan-1.3B's
``.pth``, RoPE buffer included) -> one ``.safetensors`` that the single-file loader reads into the same state as
diffusers' converter gives for the original tensors (the oracle), and the converter's one-line refusals."""
from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from engine.backbones.wan.original_names import to_original_wan
from engine.backbones.wan.single_file import read_single_file_transformer
from mvgen.cli import main

from .conftest import make_wan

T2V = dict(in_channels=16, image_dim=None, added_kv_proj_dim=None)


def _pth(state: dict, path, layout: str = "plain"):
    """Save an original-name state as the authors' scripts do: with WanModel's RoPE buffer ``freqs`` (complex)."""
    angles = torch.rand(16, 8, dtype=torch.float64)
    state = {**state, "freqs": torch.polar(torch.ones_like(angles), angles)}
    if layout == "prefixed":
        state = {f"model.diffusion_model.{key}": value for key, value in state.items()}
    # "legacy": torch's pre-1.6 format, which cannot be memory-mapped (the reader falls back to a plain load)
    torch.save({"state_dict": state} if layout == "state_dict" else state, path,
               _use_new_zipfile_serialization=layout != "legacy")
    return path


@pytest.fixture(scope="module")
def wan_t2v():
    return make_wan(seed=11, **T2V).state_dict()


@pytest.mark.parametrize("layout", ["plain", "state_dict", "prefixed", "legacy"])
def test_converted_file_loads_as_the_original_state(wan_t2v, tmp_path, capsys, layout):
    original = to_original_wan(wan_t2v)
    out = tmp_path / "phantom.safetensors"
    assert main(["convert", "wan-pth", str(_pth(original, tmp_path / "phantom.pth", layout)), str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == set(original)  # original names, the RoPE buffer left out
        assert all(torch.equal(f.get_tensor(key), value) for key, value in original.items())
    state, scales = read_single_file_transformer(out)
    assert state.keys() == wan_t2v.keys() and not scales
    assert all(torch.equal(state[key], value) for key, value in wan_t2v.items())


class Unlisted(argparse.Namespace):
    """A class torch's weights-only unpickler does not allow: loading it would run its code."""


@pytest.mark.parametrize("case", ["a non-tensor value", "an object", "an unexpected key", "no Wan transformer",
                                  "a VACE transformer"])
def test_refusals_are_one_line_and_write_nothing(wan_t2v, tmp_path, capsys, case):
    original = to_original_wan(wan_t2v)
    content, words = {
        "a non-tensor value": ({**original, "epoch": 3}, "holds values that are not tensors: 'epoch' (int)"),
        "an object": ({**original, "args": Unlisted(lr=1.0)}, "torch.load(weights_only=True) refused it"),
        "an unexpected key": ({**original, "blocks.0.self_attn.q_loras.down.weight": torch.zeros(4, 4)},
                              "not part of a Wan T2V/I2V transformer"),
        "no Wan transformer": ({"encoder.conv1.weight": torch.zeros(2, 2)}, "not a Wan transformer"),
        "a VACE transformer": ({**original, "vace_blocks.0.after_proj.bias": torch.zeros(2)}, "Wan VACE"),
    }[case]
    source = tmp_path / "bad.pth"
    torch.save(content, source)
    out = tmp_path / "out.safetensors"
    assert main(["convert", "wan-pth", str(source), str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_output_name_and_existing_file_are_refused(wan_t2v, tmp_path, capsys):
    source = _pth(to_original_wan(wan_t2v), tmp_path / "w.pth")
    assert main(["convert", "wan-pth", str(source), str(tmp_path / "w.bin")]) != 0
    assert "must end in .safetensors" in capsys.readouterr().err
    (tmp_path / "taken.safetensors").write_bytes(b"")
    assert main(["convert", "wan-pth", str(source), str(tmp_path / "taken.safetensors")]) != 0
    assert "exists" in capsys.readouterr().err
    assert main(["convert", "wan-pth", str(tmp_path / "missing.pth"), str(tmp_path / "n.safetensors")]) != 0
    assert "not found" in capsys.readouterr().err


def test_the_loader_names_the_converter_for_a_pickle(tmp_path):
    from engine.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"pickles are never loaded \(convert it: mvgen convert wan-pth w.pth"):
        read_single_file_transformer(tmp_path / "w.pth")


_PEAK = textwrap.dedent("""
    import sys
    from engine.backbones.wan import single_file
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # imported before measuring
    single_file._wan_parameter_patterns()

    def peak_kib():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))

    before = peak_kib()
    single_file.convert_pickled_transformer(sys.argv[1], sys.argv[2])
    print(peak_kib() - before)
""")


def test_converting_holds_the_model_once(tmp_path):
    """The peak resident memory grows by about the model's size, not twice it: the tensors are written as loaded."""
    model = make_wan(seed=6, **T2V, num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=12,
                     text_dim=32)
    original = to_original_wan(model.state_dict())
    size_kib = sum(t.numel() * t.element_size() for t in original.values()) // 1024
    source = _pth(original, tmp_path / "big.pth")
    del model, original
    out = subprocess.run([sys.executable, "-c", _PEAK, str(source), str(tmp_path / "big.safetensors")],
                         capture_output=True, text=True, check=True)
    grown = int(out.stdout.split()[-1])
    # measured 1.04x (53.7 of 51.7 MiB; torch.load without mmap too: the load is the one copy); a copy on the way
    # (a clone, a dtype cast, safetensors' in-memory save) would make it about 2x
    assert grown < 1.3 * size_kib, (grown, size_kib)
