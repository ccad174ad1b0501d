"""The seed methods served: models with the modes on (the tiny ``adapter_all``: PPA + identity; ``tiny-t2v`` with
``adapter_multiview``) answer each mode's request with the video the Python API makes, bit for bit, with and
without the optional inputs (identity, omega)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.tiny import TINY_VERSION
from server.client import GenerationInputs, generate
from tests.engine.test_seed_modes import SMALL, _images, mode_values
from tests.server.conftest import _serve, png


@pytest.fixture(scope="module")
def served_all(stopping, tiny_cache, tmp_path_factory):
    adapter = tiny_cache / TINY_VERSION / "adapter_all"
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served-all"), "--adapter", str(adapter))


def _pipe(model: str, tiny_cache, adapter, **overrides):
    from engine.pipeline import MultiViewPipeline

    return MultiViewPipeline.from_pretrained(model, cache_root=tiny_cache, adapter=adapter, **overrides)


@pytest.mark.parametrize("modes", [("prototype", "identity"), ("prototype",)], ids="+".join)
def test_ppa_and_identity_served_equal_the_api(served_all, tiny_cache, modes):
    first, *refs = _images(3, 1)
    values = {k: v for mode in modes for k, v in mode_values(mode).items()}
    api = _pipe("tiny", tiny_cache, tiny_cache / TINY_VERSION / "adapter_all")(first, refs, "a person turns", **SMALL, **values)
    wire = {k: [png(v) for v in vs] if k in ("frame_pose", "reference_poses") else png(vs) if k == "identity" else vs
            for k, vs in values.items()}
    frames = generate(served_all.url, GenerationInputs(prompt="a person turns", first_frame=png(first),
                                                       references=[png(r) for r in refs], **SMALL, **wire),
                      stream=False)
    assert np.array_equal(frames, api)


@pytest.mark.parametrize("omega", [None, [2.0, 0.1]])
def test_multiview_served_equals_the_api(served_t2v, tiny_cache, omega):
    """MVAnimate's mode on the T2V server (tests/server/conftest.py ``served_t2v``), with the adapter's omega or the
    request's."""
    from engine.tiny import VARIANTS

    refs = _images(3, 1)[1:]
    values = {"view_omega": omega} if omega else {}
    adapter = tiny_cache / VARIANTS["tiny-t2v"].directory / "adapter_multiview"
    api = _pipe("tiny-t2v", tiny_cache, adapter, ref_attention="isolated", ref_timestep="zero")(
        None, refs, "a person turns", **SMALL, **values)
    frames = generate(served_t2v.url, GenerationInputs(prompt="a person turns", references=[png(r) for r in refs],
                                                       **SMALL, **values), stream=False)
    assert np.array_equal(frames, api)
