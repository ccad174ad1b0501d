"""``mvgen serve`` refuses to start with one clear line; ``mvgen client generate`` writes the same outputs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from server.launcher import free_port, free_ports
from tests.server.conftest import MVGEN, png


def _ports() -> list[str]:
    grpc, http, metrics = free_ports(3)
    return ["--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics)]


def _serve(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """``mvgen serve ARGS`` as a process (for what only a process shows: its PATH, its installed packages)."""
    return subprocess.run([MVGEN, "serve", *_ports(), *args], capture_output=True, text=True, env=env, timeout=timeout)


def _mvgen(capsys, *argv: str) -> subprocess.CompletedProcess:
    """``mvgen ARGV`` through ``mvgen.cli.main`` in this process: the refusals below happen before tritonserver would
    start, and a process would add ~5 s of imports to each."""
    from mvgen.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return subprocess.CompletedProcess(argv, code, "", capsys.readouterr().err)


def _refused(capsys, *args: str) -> str:
    """The one error line of ``mvgen serve ARGS`` (run in this process)."""
    return _one_error_line(_mvgen(capsys, "serve", *_ports(), *args))


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mvgen: error: "), result.stderr
    return lines[0]


def test_taken_port(tiny_env, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _refused(capsys, "--model", "tiny", "--grpc-port", str(port))
    assert f"port {port} on 127.0.0.1 is already in use (--grpc-port)" in line


@pytest.mark.parametrize("layout", ["missing", "empty", "pickles"])
def test_invalid_model_dir(tmp_path, layout, capsys):
    model = tmp_path / "model"
    if layout != "missing":
        (model / "transformer").mkdir(parents=True)
        (model / "transformer" / "config.json").write_text("{}")
    if layout == "pickles":
        (model / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"")
    line = _refused(capsys, "--model", str(model))
    expected = {"missing": "model directory not found", "empty": "no .safetensors weights",
                "pickles": "pickled weights are never loaded"}[layout]
    assert expected in line and str(model) in line


def test_offload_on_the_cpu(tiny_env, capsys):
    """Refused before tritonserver starts, in the engine's words (``mvgen generate`` says the same)."""
    line = _refused(capsys, "--model", "tiny", "--device", "cpu", "--offload", "model")
    assert "cannot serve tiny: offload 'model' moves the denoiser between host memory and an accelerator" in line


def test_no_tritonserver(tmp_path, tiny_env):
    """PATH without tritonserver and the nvidia-pytriton wheel hidden from the interpreter."""
    hidden = tmp_path / "hide"
    (hidden / "pytriton").mkdir(parents=True)
    (hidden / "pytriton" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + "/usr/bin:/bin",
           "PYTHONPATH": str(hidden)}
    line = _one_error_line(_serve("--model", "tiny", env=env))
    assert "no tritonserver found" in line


def test_client_generate_writes_video_and_sheet(served, images, tmp_path):
    first, refs = images
    (tmp_path / "first.png").write_bytes(png(first))
    (tmp_path / "front.png").write_bytes(png(refs[0]))
    out = tmp_path / "video.mp4"
    command = [MVGEN, "client", "generate", "--url", served.url, "--first-frame", str(tmp_path / "first.png"),
               "--reference", str(tmp_path / "front.png"), "--prompt", "a person turns", "--frames", "5",
               "--height", "32", "--width", "32", "--steps", "2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0 and out.with_suffix(".png").stat().st_size > 0
    assert "2/2" in result.stderr  # the progress bar reached the last step

    bad = subprocess.run(command[:-1] + [str(tmp_path / "bad.mp4"), "--height", "40"], capture_output=True, text=True,
                         timeout=120)
    line = _one_error_line(bad)
    assert "height must be a positive multiple of 16" in line


def test_client_unreachable_server(tmp_path, images, capsys):
    (tmp_path / "first.png").write_bytes(png(images[0]))
    result = _mvgen(capsys, "client", "generate", "--url", f"127.0.0.1:{free_port()}", "--first-frame",
                    str(tmp_path / "first.png"), "--prompt", "x", "--out", str(tmp_path / "v.mp4"))
    assert "cannot reach an mvgen server" in _one_error_line(result)


@pytest.mark.parametrize("args, words", [
    (["--sp", "3"], "needs the head count to be divisible by sp; this model has 2 heads (choose sp among [1, 2])"),
    (["--sp", "0"], "--sp must be a positive number of ranks, got 0"),
    (["--sp", "2", "--worker-timeout", "0"], "--worker-timeout must be a positive number of seconds, got 0.0"),
])
def test_parallel_options_refused(tiny_env, args, words, capsys):
    """Refused before tritonserver starts (the tiny model has 2 heads)."""
    assert words in _refused(capsys, "--model", "tiny", *args)


def test_parallel_on_the_mmdit_needs_heads_divisible_by_sp(tiny_env, capsys):
    """The MMDiT serves sequence parallel too (``engine.backbones.mmdit``): refused, before a server starts, only
    where its heads do not divide among the ranks."""
    assert "divisible by sp; this model has 2 heads" in _refused(capsys, "--model", "tiny-mmdit", "--sp", "3")
