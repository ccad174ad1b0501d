"""The same video, bit for bit, from `mvgen generate`, the Python API and the server for the same request and seed,
with and without references, with the reference cache on and off where it applies; and the served reference
cache built once per request and released when the request ends, however it ends.

The three run one generation loop (``engine.generation``) over different stages: in this process, in a
fresh ``mvgen`` process (the cached configuration with references; elsewhere ``mvgen.cli.main`` runs in this process,
sparing ~5 s of imports), and as BLS calls between Triton models (whose denoiser pads every batch). The mp4 is
lossy, so the command line is compared through the lossless contact sheet it writes beside it.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from engine.media import contact_sheet
from engine.request import FIELDS
from server.client import GenerationInputs, generate
from tests.commands import run_mvgen
from tests.server.conftest import CACHEABLE, MVGEN, SMALL, png
from tests.server.test_load import _cancel_stream

PROMPT = "a person turns around"
# name -> (`--set` overrides, reference cache on, the server fixture serving it)
CONFIGS = {
    "default": ((), True, "served"),  # the tiny model as shipped: full reference attention, nothing to cache
    "cached": (CACHEABLE, True, "served_cached"),
    "uncached": (CACHEABLE, False, "served_uncached"),
}
FLAGS = {f.name: f.flag for f in FIELDS}


def _overrides(flags: tuple[str, ...]) -> dict:
    """``("--set", "k=v", ...)`` -> ``{"k": "v"}`` (the Python API's keywords)."""
    return dict(item.split("=", 1) for item in flags[1::2])


@pytest.fixture(scope="module")
def pipelines(tiny_cache):
    """One in-process pipeline per configuration, loaded when first asked for."""
    from engine.pipeline import MultiViewPipeline

    loaded = {}

    def get(config: str):
        if config not in loaded:
            flags, cache, _ = CONFIGS[config]
            loaded[config] = MultiViewPipeline.from_pretrained("tiny", cache_root=tiny_cache, reference_cache=cache,
                                                               **_overrides(flags))
        return loaded[config]

    return get


def _cli(tiny_cache, tmp_path, first: np.ndarray, refs: list[np.ndarray], config: str, process: bool) -> np.ndarray:
    """`mvgen generate` in its own process (or ``mvgen.cli.main`` in this one); its contact sheet."""
    flags, cache, _ = CONFIGS[config]
    (tmp_path / "first.png").write_bytes(png(first))
    command = [MVGEN, "--cache-dir", str(tiny_cache), "generate", "--model", "tiny", "--device", "cpu",
               "--dtype", "float32",
               "--first-frame", str(tmp_path / "first.png"), FLAGS["prompt"], PROMPT]
    for i, ref in enumerate(refs):
        (tmp_path / f"ref{i}.png").write_bytes(png(ref))
        command += [FLAGS["references"], str(tmp_path / f"ref{i}.png")]
    for name, value in SMALL.items():
        command += [FLAGS[name], str(value)]
    command += [*flags, *([] if cache else ["--no-reference-cache"]), "--out", str(tmp_path / "video.mp4")]
    run_mvgen(command, process)
    return np.asarray(Image.open(tmp_path / "video.png").convert("RGB"))


@pytest.mark.parametrize("refs", [0, 2])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cli_api_and_server_make_the_same_video(request, config, refs, images, pipelines, tiny_cache, tmp_path):
    first, views = images
    views = views[:refs]
    server = request.getfixturevalue(CONFIGS[config][2])
    api = pipelines(config)(first, views, PROMPT, **SMALL)
    served = generate(server.url, GenerationInputs(prompt=PROMPT, first_frame=png(first),
                                                   references=[png(v) for v in views], **SMALL), stream=False)
    cli = _cli(tiny_cache, tmp_path, first, views, config, process=refs > 0 and config == "cached")
    assert api.shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)
    mismatches = [f"{name} vs API: {_differ(got, want)}" for name, got, want in
                  (("server", served, api), ("CLI contact sheet", cli, contact_sheet(api)))
                  if not np.array_equal(got, want)]
    assert not mismatches, "; ".join(mismatches)


def _differ(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"shapes {a.shape} vs {b.shape}"
    diff = np.abs(a.astype(int) - b.astype(int))
    return f"{(diff > 0).sum()} of {diff.size} values differ, by up to {diff.max()}"


def _request(images, refs: int = 2, **changes) -> GenerationInputs:
    first, views = images
    return GenerationInputs(prompt=PROMPT, first_frame=png(first), references=[png(v) for v in views[:refs]],
                            **{**SMALL, **changes})


def _cache_metrics(server) -> tuple[float, float, float]:
    return tuple(server.metric(f"mvgen_reference_cache_{name}", model="mvgen_denoiser")
                 for name in ("builds_total", "entries", "bytes"))


def _wait_released(server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _cache_metrics(server)[1:] != (0, 0):
        assert time.monotonic() < deadline, f"reference cache still held {timeout} s on: {_cache_metrics(server)}"
        time.sleep(0.2)


@pytest.mark.parametrize("stream", [False, True])
def test_cached_server_builds_once_per_request_and_releases(served_cached, images, stream):
    builds, _, _ = _cache_metrics(served_cached)
    generate(served_cached.url, _request(images, steps=4), stream=stream)
    assert _cache_metrics(served_cached) == (builds + 1, 0, 0), "built once, reused for 3 steps, released at the end"
    generate(served_cached.url, _request(images, refs=0), stream=stream)  # nothing to cache without references
    assert _cache_metrics(served_cached) == (builds + 1, 0, 0)


def test_cached_server_releases_a_cancelled_request(served_cached, images):
    builds, _, _ = _cache_metrics(served_cached)
    ran = _cancel_stream(served_cached, _request(images, steps=40), after_steps=2)
    assert 2 <= ran < 40
    assert _cache_metrics(served_cached)[0] == builds + 1
    _wait_released(served_cached)


def test_uncached_server_builds_nothing(served_uncached, images):
    assert "mvgen_reference_cache_builds_total{" in served_uncached.metrics()
    generate(served_uncached.url, _request(images, steps=3), stream=False)
    assert _cache_metrics(served_uncached) == (0, 0, 0)
