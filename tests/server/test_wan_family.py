"""Wan2.1-T2V reference-to-video and Wan2.2's two experts from `mvgen generate`, the Python API and the server:
the same video, bit for bit; the served reference cache built once per expert and released. The T2V model
carries MVAnimate's multi-view attention (its tiny ``adapter_multiview``), so one server serves both."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.media import contact_sheet
from engine.request import FIELDS
from server.client import ClientError, GenerationInputs, generate
from tests.commands import run_mvgen
from tests.server.conftest import CACHEABLE, MVGEN, SMALL, _serve, png

PROMPT = "the person of the references walks"
FLAGS = {f.name: f.flag for f in FIELDS}
OVERRIDES = dict(ref_attention="isolated", ref_timestep="zero")  # CACHEABLE as Python keywords


@pytest.fixture(scope="module")
def served_wan22(stopping, tiny_cache, tmp_path_factory):
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served-wan22"), *CACHEABLE, model="tiny-wan22")


def _cli(model: str, tiny_cache, tmp_path, values: dict, *flags: str, process: bool = False) -> np.ndarray:
    """`mvgen generate --model MODEL` (``mvgen.cli.main`` in this process; in its own with ``process``, as a shell
    runs it: T2V's case here, and test_phantom's); its (lossless) contact sheet."""
    command = [MVGEN, "--cache-dir", str(tiny_cache), "generate", "--model", model, "--device", "cpu",
               "--dtype", "float32", *CACHEABLE,
               *flags]
    for name, value in values.items():
        if name in ("first_frame", "references"):
            for i, image in enumerate([value] if name == "first_frame" else value):
                (tmp_path / f"{name}{i}.png").write_bytes(png(image))
                command += [FLAGS[name], str(tmp_path / f"{name}{i}.png")]
        elif isinstance(value, list):  # a repeatable option (view_omega)
            command += [item for v in value for item in (FLAGS[name], str(v))]
        else:
            command += [FLAGS[name], str(value)]
    command += ["--out", str(tmp_path / "v.mp4")]
    run_mvgen(command, process)
    return np.asarray(Image.open(tmp_path / "v.png").convert("RGB"))


def _served(server, values: dict) -> np.ndarray:
    encoded = {k: png(v) if k == "first_frame" else [png(r) for r in v] if k == "references" else v
               for k, v in values.items()}
    return generate(server.url, GenerationInputs(**encoded), stream=True)


def _builds(server, model: str) -> tuple[float, float]:
    return (server.metric("mvgen_reference_cache_builds_total", model=model),
            server.metric("mvgen_reference_cache_entries", model=model))


def _same_everywhere(model: str, server, values: dict, tiny_cache, tmp_path, adapter=None, process=False) -> np.ndarray:
    from engine.pipeline import MultiViewPipeline

    api = MultiViewPipeline.from_pretrained(model, cache_root=tiny_cache, adapter=adapter, **OVERRIDES)(**values)
    served = _served(server, values)
    cli = _cli(model, tiny_cache, tmp_path, values, *(("--adapter", str(adapter)) if adapter else ()), process=process)
    assert api.shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)
    assert np.array_equal(served, api), "server vs API"
    assert np.array_equal(cli, contact_sheet(api)), "CLI vs API"
    return api


def test_reference_to_video_on_t2v_is_the_same_everywhere(served_t2v, images, tiny_cache, tmp_path):
    from engine.tiny import VARIANTS

    _, refs = images
    before = _builds(served_t2v, "mvgen_denoiser")
    adapter = tiny_cache / VARIANTS["tiny-t2v"].directory / "adapter_multiview"
    _same_everywhere("tiny-t2v", served_t2v, dict(prompt=PROMPT, references=refs[:2], view_omega=[0.3, 2.0], **SMALL),
                     tiny_cache, tmp_path, adapter, process=True)
    assert _builds(served_t2v, "mvgen_denoiser") == (before[0] + 1, 0)  # built once, released


def test_t2v_server_refuses_a_first_frame(served_t2v, images):
    first, refs = images
    with pytest.raises(ClientError, match="takes no first_frame"):
        _served(served_t2v, dict(prompt=PROMPT, first_frame=first, references=refs, **SMALL))


def test_wan22_is_the_same_everywhere_with_a_cache_per_expert(served_wan22, images, tiny_cache, tmp_path):
    first, refs = images
    # 6 steps: the high-noise expert runs 2, the low-noise one 4 (tiny-wan22's boundary_ratio 0.9)
    values = dict(prompt=PROMPT, first_frame=first, references=refs, guidance_scale_2=3.0, **{**SMALL, "steps": 6})
    before = [_builds(served_wan22, m) for m in ("mvgen_denoiser", "mvgen_denoiser_2")]
    _same_everywhere("tiny-wan22", served_wan22, values, tiny_cache, tmp_path)
    after = [_builds(served_wan22, m) for m in ("mvgen_denoiser", "mvgen_denoiser_2")]
    assert [(a[0] - b[0], a[1]) for a, b in zip(after, before)] == [(1, 0), (1, 0)]
