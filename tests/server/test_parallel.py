"""``mvgen serve --sp 2`` on CPU (a leader denoiser and one gloo worker): the same video as ``--sp 1``; a worker
killed mid-request fails that request within the worker timeout, the server reports not-ready while it restarts
its workers, then serves again."""
from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import psutil
import pytest

from server.client import ClientError, GenerationInputs, generate
from tests.server.conftest import SMALL, _serve, png

WORKER_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def served_sp2(stopping, tiny_cache, tmp_path_factory):
    # --deterministic as `served` (the sp = 1 side of test_sp2_equals_sp1): the same kernels on both sides
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served-sp2"), "--sp", "2", "--worker-timeout",
                      str(WORKER_TIMEOUT_S), "--deterministic")


def _request(images, **changes) -> GenerationInputs:
    first, refs = images
    return GenerationInputs(prompt="a person turns around", first_frame=png(first), references=[png(r) for r in refs],
                            **{**SMALL, **changes})


def _workers(served) -> list[psutil.Process]:
    return [p for p in psutil.Process(served.process.pid).children(recursive=True)
            if "engine.runtime.workers" in " ".join(p.cmdline())]


def _ready(served) -> bool:
    """Triton's own readiness (what a Kubernetes readiness probe asks), over HTTP."""
    port = served.process.args[served.process.args.index("--http-port") + 1]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_sp2_equals_sp1(served, served_sp2, images):
    assert len(_workers(served_sp2)) == 1 and not _workers(served)
    one = generate(served.url, _request(images), stream=False)
    two = generate(served_sp2.url, _request(images), stream=False)
    assert np.array_equal(one, two), f"max diff {np.abs(one.astype(int) - two.astype(int)).max()}"


@pytest.mark.serial  # timed against the steps of a loaded machine: run alone
def test_killed_worker_fails_the_request_and_the_server_recovers(served_sp2, images):
    before = generate(served_sp2.url, _request(images), stream=False)
    (worker,) = _workers(served_sp2)
    progress, outcome = [], {}

    def long_request():
        try:
            outcome["video"] = generate(served_sp2.url, _request(images, steps=40),
                                        lambda step, total: progress.append(step))
        except ClientError as error:
            outcome["error"] = str(error)
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 60
    while len(progress) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(progress) >= 2, "the request never got going"
    killed_at = time.monotonic()
    worker.kill()
    thread.join(WORKER_TIMEOUT_S + 30)
    assert "error" in outcome, "a request whose worker was killed mid-way succeeded"
    assert "workers are lost" in outcome["error"] and "rank 1" in outcome["error"], outcome["error"]
    assert outcome["at"] - killed_at < WORKER_TIMEOUT_S
    assert len(progress) < 40

    # not ready while the workers restart, ready again after, and the next request is served as before
    seen_not_ready, deadline = False, time.monotonic() + 240
    while time.monotonic() < deadline:
        ready = _ready(served_sp2)
        seen_not_ready |= not ready
        if seen_not_ready and ready:
            break
        time.sleep(0.1)
    assert seen_not_ready, "the server never reported not-ready while restarting its workers"
    assert _ready(served_sp2), "the server did not become ready again"
    (new_worker,) = _workers(served_sp2)
    assert new_worker.pid != worker.pid
    assert np.array_equal(generate(served_sp2.url, _request(images), stream=False), before)
