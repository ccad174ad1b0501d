"""``mvgen generate`` on files that are not what they claim (a copy of the tiny checkpoint with one file
spoiled, or a bad image): exit code 2 and one stderr line ``mvgen: error: <file>: <problem>``, no traceback.

One case runs as a real ``mvgen`` process (exit status and stderr as a shell sees them); the others call
``mvgen.cli.main`` in this process, the same code past the interpreter's start (a process costs ~5 s of imports)."""
from __future__ import annotations

import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a generation per bad file, one in a CLI process

MVGEN = str(Path(sys.executable).parent / "mvgen")
SHARD = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from engine.demo_inputs import write_demo_inputs

    return write_demo_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture
def model(tiny_cache, tmp_path):
    """A private copy of the tiny checkpoint, free to spoil."""
    from engine.tiny import ensure_tiny

    return Path(shutil.copytree(ensure_tiny(tiny_cache), tmp_path / "model"))


# the case run as a process
IN_A_PROCESS = "corrupt transformer shard"


def _generate(model: Path, demo, out: Path, *extra: str, process: bool, capsys, monkeypatch) -> tuple[int, str]:
    """(exit status, stderr) of ``mvgen generate`` on the spoiled inputs."""
    args = ["generate", "--model", str(model), "--first-frame", str(demo["first_frame"]),
            "--reference", str(demo["front"]), "--prompt", "a person turns around", "--frames", "5",
            "--height", "32", "--width", "32", "--steps", "1", "--device", "cpu", "--out", str(out), *extra]
    cache = str(model.parent / "cache")
    if process:
        result = subprocess.run([MVGEN, *args], capture_output=True, text=True, env={**os.environ, "MVGEN_CACHE": cache},
                                timeout=300)
        return result.returncode, result.stderr
    from mvgen.cli import main

    monkeypatch.setenv("MVGEN_CACHE", cache)
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (CRC fixed) claims width x height."""
    import io

    from PIL import Image

    data = io.BytesIO()
    Image.new("RGB", (1, 1)).save(data, format="PNG")
    data = bytearray(data.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 20)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"lora": [0.0] * 8}))


def _half_json(path: Path) -> None:
    path.write_text(path.read_text()[:20])


def _text(path: Path) -> None:
    path.write_text("this is not an image\n")


def _truncated_png(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _huge_png(path: Path) -> None:
    path.write_bytes(_png_claiming(20_000, 20_000))


# case: (file spoiled (in the model copy, or "image"), how, extra arguments, words of the error)
CASES = {
    "corrupt transformer shard": (SHARD, _garbage, [], "not a safetensors file"),
    "truncated VAE": ("vae/diffusion_pytorch_model.safetensors", _truncate, [], "truncated: tensor"),
    "truncated text encoder": ("text_encoder/model.safetensors", _truncate, [], "100 bytes missing"),
    "pickled adapter": ("adapter/adapter_model.safetensors", _pickle, ["--adapter", "{model}/adapter"],
                        "is a pickle, not safetensors; pickles are never loaded"),
    "bad transformer config.json": ("transformer/config.json", _half_json, [], "not valid JSON"),
    "bad adapter mvgen_config.json": ("adapter/mvgen_config.json", _half_json, ["--adapter", "{model}/adapter"],
                                      "not valid JSON"),
    "text as first frame": ("first_frame.png", _text, [], "it holds text ('this is not an image\\n')"),
    "truncated first frame": ("first_frame.png", _truncated_png, [], "(corrupt or truncated?)"),
    "too large first frame": ("first_frame.png", _huge_png, [], "has 400000000 pixels, more than the limit"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_file_exits_2_in_one_line_naming_it(model, demo, tmp_path, case, capsys, monkeypatch):
    name, spoil, extra, words = CASES[case]
    if name == "first_frame.png":
        target = tmp_path / name
        shutil.copy(demo["first_frame"], target)
        demo = {**demo, "first_frame": target}
    else:
        target = model / name
    spoil(target)
    out = tmp_path / "video.mp4"
    code, stderr = _generate(model, demo, out, *[a.format(model=model) for a in extra], process=case == IN_A_PROCESS,
                             capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1 and stderr.startswith("mvgen: error: "), stderr
    assert str(target) in stderr and words in stderr, stderr
    assert not out.exists()
