"""``mvgen generate``, ``tiny`` and ``demo-inputs``: the README run end to end, one-line errors (exit 2)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvgen.cli import main

MVGEN = str(Path(sys.executable).parent / "mvgen")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from engine.demo_inputs import write_demo_inputs

    return write_demo_inputs(tmp_path_factory.mktemp("inputs"))


def _run(args, cache):
    env = {**os.environ, "MVGEN_CACHE": str(cache)}
    return subprocess.run([MVGEN, *args], capture_output=True, text=True, env=env, timeout=300)


def _generate_args(demo, out, *extra):
    return ["generate", "--model", "tiny", "--first-frame", str(demo["first_frame"]),
            "--first-frame-mask", str(demo["first_frame_mask"]),
            *[a for view in ("front", "back", "side") for a in ("--reference", str(demo[view]))],
            "--prompt", "a person turns around", "--out", str(out), *extra]


@pytest.mark.slow
def test_generate_end_to_end_writes_mp4_and_contact_sheet(demo, tiny_cache, tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "video.mp4"
    result = _run(_generate_args(demo, out, "--seed", "3"), tiny_cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(out), str(out.with_suffix(".png"))]
    video = iio.imread(out, plugin="FFMPEG")
    assert video.shape == (9, 64, 64, 3)
    with Image.open(out.with_suffix(".png")) as sheet:
        assert sheet.size == (3 * 64 + 2 * 2, 3 * 64 + 2 * 2)


@pytest.mark.slow
def test_references_at_their_own_size_end_to_end(demo, tiny_cache, tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "video.mp4"
    small = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "1"]
    result = _run(_generate_args(demo, out, *small, "--ref-size", "32x48"), tiny_cache)
    assert result.returncode == 0, result.stderr
    assert iio.imread(out, plugin="FFMPEG").shape == (5, 32, 32, 3)
    bad = _run(_generate_args(demo, tmp_path / "bad.mp4", *small, "--ref-size", "48x20"), tiny_cache)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("mvgen: error: ")
    assert "ref_size width must be a positive multiple of 16, got 20" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("extra, words", [
    (["--height", "100"], "height must be a positive multiple of 16"),
    (["--first-frame", "/nonexistent.png"], "file not found"),
])
def test_bad_arguments_exit_2_in_one_line_without_traceback(demo, tiny_cache, tmp_path, extra, words):
    result = _run(_generate_args(demo, tmp_path / "v.mp4", *extra), tiny_cache)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("mvgen: error: ")
    assert words in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("extra, words", [
    (["--width", "72"], "width must be a positive multiple of 16, got 72 (nearest: 64 or 80)"),
    (["--frames", "10"], "frames must be 4k+1"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--guidance-scale", "-2"], "guidance_scale must be a number >= 0"),
    (["--reference", "{front}"], "got 4 references, this model takes at most 3"),
    (["--reference", "{unreadable}"], "cannot read"),
    (["--first-frame-mask", "/nope/mask.png"], "file not found"),
    (["--frames", "nine"], "argument --frames: invalid int value: 'nine'"),
    (["--dtype", "float64"], "argument --dtype: invalid choice"),
    (["--offload", "layer"], "argument --offload: invalid choice: 'layer'"),
    (["--offload", "block", "--device", "cpu"], "offload 'block' moves the denoiser between host memory and an "
                                                "accelerator, and the device is the CPU"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--set", "ref_attention"], "--set expects KEY=VALUE"),
    (["--set", "ref_attention=sideways"], "ref_attention must be one of"),
    (["--set", "no_such_key=1"], "unknown config override"),
    (["--model", "/nonexistent/model"], "model directory not found"),
    (["--out", "{tmp}/video.gif"], "--out must name an .mp4 file"),
    (["--out", "{unreadable}/video.mp4"], "unreadable.png is not a directory"),
    (["--fps", "0"], "--fps must be a positive integer"),
    (["--ref-size", "32x40"], "ref_size width must be a positive multiple of 16, got 40 (nearest: 32 or 48)"),
    (["--ref-size", "32"], "argument --ref-size: expected HEIGHTxWIDTH (e.g. 720x720), got '32'"),
])
def test_bad_arguments_in_process(demo, tiny_env, tmp_path, capsys, extra, words):
    unreadable = tmp_path / "unreadable.png"
    unreadable.write_bytes(b"not a png")
    extra = [a.format(front=demo["front"], unreadable=unreadable, tmp=tmp_path) for a in extra]
    assert main(_generate_args(demo, tmp_path / "v.mp4", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvgen: error: ") and err.count("\n") == 1 and words in err, err


@pytest.mark.parametrize("command", [["generate", "--prompt", "p", "--out", "v.mp4"], ["serve"]])
def test_memory_options_share_one_declaration(command):
    """``--dtype``/``--offload`` choices are ``engine.checkpoint.DTYPES``/``engine.runtime.offload.OFFLOAD_MODES``, the
    defaults auto/none, and ``--help`` says what auto does on a CPU."""
    import argparse

    from engine.cli_args import add_memory_arguments
    from engine.devices import DTYPES
    from engine.runtime.offload import OFFLOAD_MODES
    from mvgen.cli import build_parser

    args = build_parser({}).parse_args(command)
    assert (args.dtype, args.offload, args.vae_tiling) == ("auto", "none", False)
    probe = argparse.ArgumentParser()
    add_memory_arguments(probe)
    actions = {a.dest: a for a in probe._actions}
    assert tuple(actions["dtype"].choices) == DTYPES and tuple(actions["offload"].choices) == OFFLOAD_MODES
    assert "auto: bfloat16 on CUDA; on a CPU float32 unless" in actions["dtype"].help and "9x" in actions["dtype"].help


def test_tiny_and_demo_inputs_commands(tiny_env, tmp_path, capsys):
    assert main(["tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_env / "tiny-v2")
    assert main(["demo-inputs", "--out", str(tmp_path / "in")]) == 0
    paths = capsys.readouterr().out.split()
    assert [Path(p).name for p in paths] == ["first_frame.png", "first_frame_mask.png", "front.png", "back.png",
                                             "side.png"]
    mask = np.asarray(Image.open(paths[1]))
    assert mask.dtype == np.uint8 and 0.05 < (mask > 127).mean() < 0.5


@pytest.mark.parametrize("extra, words", [
    (["--height", "30"], "height must be a positive multiple of 16"),
    (["--frames", "6"], "num_frames must be 4k+1"),
])
def test_a_bad_request_is_refused_before_any_weight_is_read(demo, tiny_cache, tmp_path, capsys, extra, words):
    """The request is checked against the weightless checkpoint description: a copy of tiny whose denoiser
    shards are garbage still answers a bad number with the number's error, not the shard's."""
    import shutil

    model = tmp_path / "tiny"
    shutil.copytree(tiny_cache / "tiny-v2", model)
    for shard in (model / "transformer").glob("*.safetensors"):
        shard.write_bytes(b"garbage")
    args = _generate_args(demo, tmp_path / "v.mp4", *extra)
    args[args.index("tiny")] = str(model)
    assert main(["--cache-dir", str(tiny_cache), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvgen: error: ") and err.count("\n") == 1 and words in err, err
