"""Stand-In served by the real tritonserver: ``tiny-standin`` (Wan2.1-T2V with Stand-In's LoRA) the same video from the
server, the Python API and ``mvgen generate``, bit for bit, its reference stream built once per request (the
``mvgen_reference_cache_builds_total`` counter) and released; and Wan2.2-T2V-A14B (``tiny-wan22-t2v``) with Stand-In's
high/low pair as ``--adapter``/``--adapter-2``, served as ``mvgen generate`` makes it, a cache per expert."""
from __future__ import annotations

import numpy as np
import pytest

from engine.media import contact_sheet
from tests.server.conftest import SMALL, _serve
from tests.server.test_wan_family import _builds, _cli, _served

PROMPT = "the person of the reference smiles"


@pytest.fixture(scope="module")
def served_standin(stopping, tiny_cache, tmp_path_factory):
    """``mvgen serve --model tiny-standin``: its adapter's config makes the reference stream cacheable."""
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served-standin"), model="tiny-standin")


@pytest.fixture(scope="module")
def stand_in_pair(tmp_path_factory):
    from engine.tiny import TRANSFORMER_CONFIG, VARIANTS, write_stand_in_adapter

    root = tmp_path_factory.mktemp("stand-in-pair")
    config = {**TRANSFORMER_CONFIG, **VARIANTS["tiny-wan22-t2v"].transformer}
    return tuple(write_stand_in_adapter(root / name, config, seed) for name, seed in (("high", 31), ("low", 32)))


@pytest.fixture(scope="module")
def served_wan22_t2v(stopping, tiny_cache, tmp_path_factory, stand_in_pair):
    high, low = stand_in_pair
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served-wan22-t2v"), "--adapter", str(high),
                      "--adapter-2", str(low), model="tiny-wan22-t2v")


def test_stand_in_is_the_same_everywhere_and_builds_its_reference_once(served_standin, images, tiny_cache,
                                                                       tmp_path):
    from engine.pipeline import MultiViewPipeline

    _, refs = images
    values = dict(prompt=PROMPT, references=refs[:1], **SMALL)
    before = _builds(served_standin, "mvgen_denoiser")
    served = _served(served_standin, values)
    # 2 steps x 2 guidance rows read one reference stream, built at the first step and released at the end
    assert _builds(served_standin, "mvgen_denoiser") == (before[0] + 1, 0)
    api = MultiViewPipeline.from_pretrained("tiny-standin", cache_root=tiny_cache)(**values)
    cli = _cli("tiny-standin", tiny_cache, tmp_path, values)
    assert served.shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)
    assert served.std() > 10  # a real picture, not a saturated one (NaN latents decode to black)
    assert np.array_equal(served, api), "server vs API"
    assert np.array_equal(cli, contact_sheet(served)), "server vs `mvgen generate`"


@pytest.mark.slow
def test_wan22_t2v_with_stand_ins_pair_is_served_as_generate_makes_it(served_wan22_t2v, stand_in_pair, images,
                                                                      tiny_cache, tmp_path):
    high, low = stand_in_pair
    _, refs = images
    # 6 steps: the high-noise expert runs 2, the low-noise one 4 (boundary_ratio 0.875)
    values = dict(prompt=PROMPT, references=refs[:1], guidance_scale_2=3.0, **{**SMALL, "steps": 6})
    before = [_builds(served_wan22_t2v, m) for m in ("mvgen_denoiser", "mvgen_denoiser_2")]
    served = _served(served_wan22_t2v, values)
    after = [_builds(served_wan22_t2v, m) for m in ("mvgen_denoiser", "mvgen_denoiser_2")]
    assert [(a[0] - b[0], a[1]) for a, b in zip(after, before)] == [(1, 0), (1, 0)]
    cli = _cli("tiny-wan22-t2v", tiny_cache, tmp_path, values, "--adapter", str(high), "--adapter-2", str(low))
    assert np.array_equal(cli, contact_sheet(served)), "server vs `mvgen generate`"
