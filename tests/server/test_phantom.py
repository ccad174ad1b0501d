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
def served_phantom(stopping, tiny_cache, tmp_path_factory):
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served-phantom"), "--deterministic",
                      model="tiny-phantom")


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



def test_phantom_rows_batch_with_other_requests(served_phantom, references):
    """Three Phantom rows and two cfg rows per request share the denoiser's batches: the rows each batch held add
    up to every request's rows x steps, some batch held more than one request, and the Phantom request's bits are
    those it has alone (``--deterministic``)."""
    target = dict(REQUEST, references=references, steps=4)
    others = [dict(target, guidance="cfg"), dict(target, seed=12), dict(target, guidance="cfg", seed=13)]
    alone = _served(served_phantom, target)
    before = {name: served_phantom.metric(name) for name in (
        "mvgen_denoiser_batch_rows_sum", "mvgen_denoiser_batch_requests_count")}
    single_before = served_phantom.metric("mvgen_denoiser_batch_requests_bucket", le="1")
    with ThreadPoolExecutor(4) as pool:
        results = [f.result(timeout=240) for f in [pool.submit(_served, served_phantom, v) for v in [target, *others]]]
    assert np.array_equal(results[0], alone), "the Phantom request changed when batched with others"
    assert not np.array_equal(results[0], results[1])  # the cfg request's rows and combination differ
    rows = served_phantom.metric("mvgen_denoiser_batch_rows_sum") - before["mvgen_denoiser_batch_rows_sum"]
    assert rows == 4 * (3 + 2 + 3 + 2)  # steps x each request's rows
    batches = (served_phantom.metric("mvgen_denoiser_batch_requests_count")
               - before["mvgen_denoiser_batch_requests_count"])
    single = served_phantom.metric("mvgen_denoiser_batch_requests_bucket", le="1") - single_before
    assert batches - single > 0, "no denoiser batch held more than one request"
