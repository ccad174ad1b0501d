"""Ready means warm: every served model pays its one-time costs at load (``engine.warmup``), so the first request
after the server reports ready takes no longer than the second."""
from __future__ import annotations

import re
import time

import pytest

from server.repository import RepositoryOptions, build_repository
from tests.server.conftest import SERVED_MODELS, _serve

# The tiny default request takes 0.6 to 0.9 s end to end on 2 CPU cores shared with other jobs, and one request
# varies by +-15% from the next; a server that did not warm up answers its first ~0.15 to 0.3 s (25%) slower. So the
# first is compared with the slowest of the next three (the second included), not with the second alone: warm, it
# stays under 1.1x that; unwarmed it does not.
LATER = 4


@pytest.fixture(scope="module")
def fresh_server(stopping, tiny_cache, tmp_path_factory):
    """A server of its own: the session's ``served`` has answered other tests' requests already."""
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served-warm"))


@pytest.mark.serial
def test_the_first_request_after_ready_takes_at_most_1_1x_the_second(fresh_server):
    from benchmarks.server_memory import default_inputs
    from server.client import GenerationInputs, generate

    # the default request's shapes (what the warm-up ran), with enough steps that a tiny request's ~20% run-to-run
    # spread on 2 shared cores does not decide the comparison
    request = GenerationInputs(**{**default_inputs().values, "steps": 12})
    seconds = []
    for _ in range(1 + LATER):
        start = time.perf_counter()
        generate(fresh_server.url, request)
        seconds.append(time.perf_counter() - start)
    first, later = seconds[0], seconds[1:]
    print(f"\nfirst request after ready {first:.3f} s, then {', '.join(f'{s:.3f}' for s in later)} s: "
          f"{first / later[0]:.2f}x the second, {first / max(later):.2f}x the slowest of the next {LATER}")
    assert first <= 1.1 * max(later), f"the first request took {first:.3f} s, the next ones {later} s"
    # one warm-up line per served model, with its seconds (server.models)
    warmed = dict(re.findall(r'"(\w+): warm-up full of .*; ([\d.]+) s"', fresh_server.log.read_text()))
    assert set(warmed) == set(SERVED_MODELS["tiny"])


@pytest.mark.parametrize("mode", ["full", "weights", "none"])
def test_the_repository_tells_every_model_its_warmup(tiny_cache, tmp_path, mode):
    dest = build_repository(tmp_path, RepositoryOptions(cache_root=str(tiny_cache), warmup=mode))
    for model in SERVED_MODELS["tiny"]:
        text = (dest / model / "config.pbtxt").read_text()
        assert f'key: "warmup" value: {{ string_value: "{mode}" }}' in text


def test_an_unknown_warmup_is_refused_before_a_server_starts(tiny_cache, tmp_path):
    with pytest.raises(ValueError, match="warmup must be one of full, weights, none, got 'fast'"):
        build_repository(tmp_path, RepositoryOptions(cache_root=str(tiny_cache), warmup="fast"))
