"""The seed methods served: a model with every mode on (the tiny ``adapter_all``) answers each mode's request with
the video the Python API makes, bit for bit, and a request without the mode's inputs too."""
from __future__ import annotations

import numpy as np
import pytest

from engine.tiny import TINY_VERSION
from server.client import GenerationInputs, generate
from tests.engine.test_seed_modes import MODES, SMALL, _images, mode_values
from tests.server.conftest import _serve, png


@pytest.fixture(scope="module")
def served_modes(tiny_cache, tmp_path_factory):
    adapter = tiny_cache / TINY_VERSION / "adapter_all"
    yield from _serve(tiny_cache, tmp_path_factory.mktemp("served-modes"), "--adapter", str(adapter))


@pytest.fixture(scope="module")
def pipe(tiny_cache):
    from engine.pipeline import MultiViewPipeline

    return MultiViewPipeline.from_pretrained("tiny", cache_root=tiny_cache,
                                             adapter=tiny_cache / TINY_VERSION / "adapter_all")


@pytest.mark.parametrize("mode", [*MODES, "none"])
def test_each_mode_served_equals_the_api(served_modes, pipe, mode):
    first, *refs = _images(3, 1)
    values = mode_values(mode) if mode != "none" else {}
    if mode != "prototype":  # a prototype model needs poses with references: the other modes send them too
        values = {**mode_values("prototype"), **values}
    api = pipe(first, refs, "a person turns", **SMALL, **values)
    wire = {k: [png(v) for v in vs] if k in ("frame_pose", "reference_poses") else png(vs) if k == "identity" else vs
            for k, vs in values.items()}
    served = generate(served_modes.url, GenerationInputs(prompt="a person turns", first_frame=png(first),
                                                         references=[png(r) for r in refs], **SMALL, **wire),
                      stream=False)
    assert np.array_equal(served, api)
