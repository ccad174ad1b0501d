"""Phantom-Wan (``tiny-phantom``: original-name transformer shards, letterboxed references, three guidance rows)
from one server start, `mvgen generate` and the Python API, all ``--deterministic``: the same video, bit for bit;
a Phantom request batched with a classifier-free one in the same denoiser calls keeps its bits."""
from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from engine.media import contact_sheet
from server.client import GenerationInputs, generate
from tests.server.conftest import MVGEN, _serve, png

# tiny-phantom's defaults (guidance phantom, 7.5 / 5.0, letterbox, shift 5) are not set here: the request leaves
# them to the model, as a user would
REQUEST = dict(prompt="the person of the references walks", negative_prompt="static", num_frames=5, height=32,
               width=48, steps=2, seed=11)


@pytest.fixture(scope="module")
def served_phantom(tiny_cache, tmp_path_factory):
    yield from _serve(tiny_cache, tmp_path_factory.mktemp("served-phantom"), "--deterministic", model="tiny-phantom")


@pytest.fixture
def references():
    rng = np.random.default_rng(2027)  # a wide and a tall view: white bands on different sides
    return [rng.integers(0, 256, (24, 61, 3), dtype=np.uint8), rng.integers(0, 256, (50, 19, 3), dtype=np.uint8)]


def _cli(tiny_cache, tmp_path, values: dict) -> np.ndarray:
    """`mvgen generate --model tiny-phantom --deterministic` in its own process; its (lossless) contact sheet."""
    command = [MVGEN, "--cache-dir", str(tiny_cache), "generate", "--model", "tiny-phantom", "--device", "cpu",
               "--dtype", "float32", "--deterministic", "--prompt", values["prompt"], "--negative-prompt",
               values["negative_prompt"], "--frames", str(values["num_frames"]), "--height", str(values["height"]),
               "--width", str(values["width"]), "--steps", str(values["steps"]), "--seed", str(values["seed"])]
    for i, image in enumerate(values["references"]):
        (tmp_path / f"ref{i}.png").write_bytes(png(image))
        command += ["--reference", str(tmp_path / f"ref{i}.png")]
    done = subprocess.run([*command, "--out", str(tmp_path / "v.mp4")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.asarray(Image.open(tmp_path / "v.png").convert("RGB"))


def _served(server, values):
    return generate(server.url, GenerationInputs(**{**values, "references": [png(r) for r in values["references"]]}),
                    stream=True)


def test_phantom_is_the_same_served_cli_and_api(served_phantom, references, tiny_cache, tmp_path):
    from engine.pipeline import MultiViewPipeline

    values = dict(REQUEST, references=references)
    api = MultiViewPipeline.from_pretrained("tiny-phantom", cache_root=tiny_cache, deterministic=True)(**values)
    served = _served(served_phantom, values)
    cli = _cli(tiny_cache, tmp_path, values)
    assert api.shape == (5, 32, 48, 3)
    assert np.array_equal(served, api), "server vs API"
    assert np.array_equal(cli, contact_sheet(api)), "CLI vs API"

    # batched with a classifier-free request of the same shapes (5 rows in one denoiser call when they meet): the
    # Phantom request's bits do not change; the cfg request's video differs (its rows and combination differ)
    with ThreadPoolExecutor(2) as pool:
        both = [pool.submit(_served, served_phantom, v) for v in (values, dict(values, guidance="cfg"))]
        alongside, cfg = (f.result() for f in both)
    assert np.array_equal(alongside, served)
    assert not np.array_equal(cfg, served)
