"""The seed methods served: models with the modes on (the tiny ``adapter_all``: PPA + identity;
``adapter_multiview``) answer each mode's request with the video the Python API makes, bit for bit, and a request
without the mode's inputs too."""
from __future__ import annotations

import numpy as np
import pytest

from engine.tiny import TINY_VERSION
from server.client import GenerationInputs, generate
from tests.engine.test_seed_modes import SMALL, _images, mode_values
from tests.server.conftest import _serve, png


@pytest.fixture(scope="module")
def served(tiny_cache, tmp_path_factory):
    """One server per adapter, started when first asked for."""
    started, stops = {}, []

    def get(adapter: str):
        if adapter not in started:
            path = tiny_cache / TINY_VERSION / f"adapter_{adapter}"
            serving = _serve(tiny_cache, tmp_path_factory.mktemp(f"served-{adapter}"), "--adapter", str(path))
            started[adapter] = next(serving)
            stops.append(serving)
        return started[adapter]

    yield get
    for serving in stops:
        next(serving, None)  # SIGINT, and the exit-code check


@pytest.fixture(scope="module")
def pipes(tiny_cache):
    from engine.pipeline import MultiViewPipeline

    loaded = {}

    def get(adapter: str):
        if adapter not in loaded:
            loaded[adapter] = MultiViewPipeline.from_pretrained(
                "tiny", cache_root=tiny_cache, adapter=tiny_cache / TINY_VERSION / f"adapter_{adapter}")
        return loaded[adapter]

    return get


# (the adapter served, the modes whose inputs the request carries)
CASES = {"prototype+identity": ("all", ("prototype", "identity")), "prototype": ("all", ("prototype",)),
         "multiview": ("multiview", ("multiview",)), "none": ("multiview", ())}


@pytest.mark.parametrize("case", list(CASES))
def test_each_mode_served_equals_the_api(served, pipes, case):
    adapter, modes = CASES[case]
    first, *refs = _images(3, 1)
    values = {k: v for mode in modes for k, v in mode_values(mode).items()}
    api = pipes(adapter)(first, refs, "a person turns", **SMALL, **values)
    wire = {k: [png(v) for v in vs] if k in ("frame_pose", "reference_poses") else png(vs) if k == "identity" else vs
            for k, vs in values.items()}
    frames = generate(served(adapter).url, GenerationInputs(prompt="a person turns", first_frame=png(first),
                                                            references=[png(r) for r in refs], **SMALL, **wire),
                      stream=False)
    assert np.array_equal(frames, api)
