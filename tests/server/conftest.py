"""One real ``tritonserver`` (started by ``mvgen serve`` on free loopback ports) for the server tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (pip install 'mvgen[server]')")

from server.launcher import LaunchError, find_tritonserver, free_ports  # noqa: E402

MVGEN = str(Path(sys.executable).parent / "mvgen")
MODELS = ("mvgen", "mvgen_stream", "mvgen_text_encoder", "mvgen_image_encoder", "mvgen_vae", "mvgen_denoiser")
# the models each embedded checkpoint is served as (T2V and Wan2.2 have no CLIP; Wan2.2 a denoiser per expert)
SERVED_MODELS = {
    "tiny": MODELS,
    "tiny-t2v": tuple(m for m in MODELS if m != "mvgen_image_encoder"),
    "tiny-wan22": (*(m for m in MODELS if m != "mvgen_image_encoder"), "mvgen_denoiser_2"),
    "tiny-mmdit": tuple(m for m in MODELS if m != "mvgen_image_encoder"),  # HunyuanVideo: no CLIP image encoder
    "tiny-ti2v": tuple(m for m in MODELS if m != "mvgen_image_encoder"),  # Wan2.2-TI2V-5B: no CLIP
    "tiny-standin": tuple(m for m in MODELS if m != "mvgen_image_encoder"),  # Wan2.1-T2V with Stand-In
    "tiny-wan22-t2v": (*(m for m in MODELS if m != "mvgen_image_encoder"), "mvgen_denoiser_2"),
    "tiny-phantom": tuple(m for m in MODELS if m != "mvgen_image_encoder"),  # Phantom-Wan: Wan2.1-T2V, no CLIP
}
START_TIMEOUT_S = 300
MAX_TOKENS = 4096  # a small budget, so the over-budget request in the tests is cheap to build
# a small request: 5 frames of 32x32, 2 steps (the tiny model makes noise; shapes are what matter)
SMALL = dict(num_frames=5, height=32, width=32, steps=2, guidance_scale=5.0, seed=7)


@dataclass
class Served:
    url: str
    metrics_url: str
    process: subprocess.Popen
    log: Path
    output: list[str] = field(default_factory=list)  # what mvgen serve printed so far (read by a thread)

    def tree_rss(self) -> int:
        """Resident memory of tritonserver and every process below it (the python backend stubs), bytes."""
        from benchmarks.server_memory import tree_rss

        return tree_rss(self.process.pid)

    def metrics(self) -> str:
        """The metrics page. A refused connection is retried for a few seconds: once, in a full suite on 2 busy
        cores, tritonserver's metrics endpoint refused one scrape minutes after it had started (a scraper such as
        Prometheus retries at its next interval); a server that stays unreachable still fails the test."""
        for attempt in range(5):
            try:
                with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                    return response.read().decode()
            except urllib.error.URLError as error:
                if attempt == 4 or not isinstance(error.reason, ConnectionRefusedError):
                    raise
                time.sleep(1)

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total


def _tritonserver_available() -> str | None:
    try:
        find_tritonserver()
    except LaunchError as error:
        return str(error)
    return None


@pytest.fixture(scope="session")
def served(stopping, tiny_cache, tmp_path_factory):
    """``mvgen serve --model tiny --deterministic`` on free loopback ports (a request's bits do not depend on its
    batch companions: test_load); SIGINT at the end must stop it with exit code 0."""
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served"), "--deterministic")


# `--set` overrides that make the tiny model's reference stream cacheable (MvgenConfig.caches_reference)
CACHEABLE = ("--set", "ref_attention=isolated", "--set", "ref_timestep=zero")


@pytest.fixture(scope="session")
def served_cached(stopping, tiny_cache, tmp_path_factory):
    """The tiny model with a cacheable reference stream, the denoiser's reference K/V cache on (the default)."""
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served-cached"), *CACHEABLE)


@pytest.fixture(scope="session")
def served_uncached(stopping, tiny_cache, tmp_path_factory):
    """The same cacheable model served with ``--no-reference-cache``: references recomputed at every step."""
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served-uncached"), *CACHEABLE,
                      "--no-reference-cache")


@pytest.fixture(scope="session")
def served_t2v(stopping, tiny_cache, tmp_path_factory):
    """``tiny-t2v`` (reference-to-video) with MVAnimate's multi-view attention (its ``adapter_multiview``) and a
    cacheable reference stream: one server for the T2V family and the multiview mode."""
    from engine.tiny import VARIANTS

    adapter = tiny_cache / VARIANTS["tiny-t2v"].directory / "adapter_multiview"
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served-t2v"), *CACHEABLE, "--adapter",
                      str(adapter), model="tiny-t2v")


@pytest.fixture(scope="module")
def served_ti2v(stopping, tiny_cache, tmp_path_factory):
    """``tiny-ti2v`` (Wan2.2-TI2V-5B: a first frame optional) under ``--deterministic``, the reference stream cacheable
    as ``served_t2v``'s (``test_wan_family._cli`` passes the same flags to ``mvgen generate``)."""
    yield from _serve(stopping, tiny_cache, tmp_path_factory.mktemp("served-ti2v"), *CACHEABLE, "--deterministic",
                      model="tiny-ti2v")


def _serve(stopping: list, tiny_cache, work: Path, *extra: str, model: str = "tiny"):
    """Start ``mvgen serve --model MODEL [extra]`` and yield it ready; then SIGINT it and hand it to ``stopping``,
    which requires exit code 0 at the end of the session."""
    reason = _tritonserver_available()
    if reason:
        pytest.skip(reason)
    grpc, http, metrics = free_ports(3)
    env = {**os.environ, "MVGEN_CACHE": str(tiny_cache)}
    log = work / "tritonserver.log"
    command = [MVGEN, "serve", "--model", model, "--grpc-port", str(grpc), "--http-port", str(http),
               "--metrics-port", str(metrics), "--log-file", str(log), "--device", "cpu", "--dtype", "float32",
               "--max-tokens", str(MAX_TOKENS), *extra]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Served(f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics", process, log)
    # drained as it comes: a full pipe would block mvgen serve, and _wait_ready waits for its "ready:" line
    threading.Thread(target=lambda: server.output.extend(iter(process.stdout.readline, "")), daemon=True).start()
    ready = False
    try:
        _wait_ready(server, SERVED_MODELS[model])
        ready = True
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        if ready:
            stopping.append((server, f"--model {model} {' '.join(extra)}"))
        else:  # one that never came up keeps _wait_ready's error (its output), which a later assertion would bury
            _exit_code(process)


@pytest.fixture(scope="session")
def stopping():
    """The served processes whose fixtures are done. Each got SIGINT and stops while the tests go on: Triton unloads
    every model and each stub exits, ~4 s (more on a loaded machine) that a worker would otherwise sit idle for. At
    the end of the session each must have exited with code 0."""
    servers: list[tuple[Served, str]] = []
    yield servers
    failures = []
    for server, what in servers:
        code = _exit_code(server.process)
        if code != 0:
            failures.append(f"mvgen serve {what} exited with {code} on SIGINT:\n{''.join(server.output)[-2000:]}")
    assert not failures, "\n".join(failures)


def _exit_code(process: subprocess.Popen) -> int:
    """The exit code of a server sent SIGINT; killed if it has not stopped within 120 s."""
    try:
        return process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def _wait_ready(server: Served, models: tuple[str, ...]) -> None:
    """Until mvgen serve prints that it is ready (after Triton's readiness, once its supervisor watches: a SIGINT
    before that line ends it with 130, not 0); then Triton must report every model the checkpoint is served as."""
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + START_TIMEOUT_S
    while not any(line.startswith("mvgen serve: ready:") for line in server.output):
        if server.process.poll() is not None:
            time.sleep(0.5)  # the reader thread takes the last lines
            raise RuntimeError(f"mvgen serve exited ({server.process.returncode}): {''.join(server.output)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s; log {server.log}")
        time.sleep(0.2)
    client = grpcclient.InferenceServerClient(server.url)
    missing = [m for m in models if not client.is_model_ready(m)]
    assert client.is_server_ready() and not missing, f"mvgen serve is ready but Triton's models are not: {missing}"


@pytest.fixture
def images():
    """A first frame and three reference views (RGB uint8), fresh from a seeded generator per test."""
    rng = np.random.default_rng(1234)
    first = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    refs = [rng.integers(0, 256, (40, 32, 3), dtype=np.uint8) for _ in range(3)]
    return first, refs


def png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def refusal(client, tensors: dict, stream: bool) -> str:
    """The error message the ``mvgen`` (unary) or ``mvgen_stream`` model answers a request it must refuse."""
    import queue

    from server.client import infer_inputs

    inputs = infer_inputs(tensors)
    if not stream:
        with pytest.raises(Exception) as caught:
            client.infer("mvgen", inputs, client_timeout=30)
        return caught.value.message() if hasattr(caught.value, "message") else str(caught.value)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("mvgen_stream", inputs)
        result, error = results.get(timeout=30)
        assert error is not None, "a request that must be refused streamed a result"
        return error.message()
    finally:
        client.stop_stream()
