"""A dedicated ``mvgen serve`` for the supervision tests (they kill its processes), and what they look at: the stubs,
the health endpoint (``server.health``), Triton's model readiness, the restarts metric."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest

from server.client import ClientError, GenerationInputs, generate, infer_inputs
from server.launcher import free_ports
from tests.server.conftest import (MAX_TOKENS, MVGEN, SERVED_MODELS, SMALL, _exit_code, _tritonserver_available,
                                   png)

CALL_TIMEOUT_S = 6.0  # --call-timeout of these servers: the bound of every call of the tests' small requests
RECOVERY_S = 60.0  # the bound: serving again within a minute of the fault
POLL_S = 0.05


@dataclass
class Supervised:
    process: subprocess.Popen  # mvgen serve
    model: str
    grpc: int
    http: int
    health: int
    repository: Path
    log: Path
    output: list = field(default_factory=list)  # mvgen serve's own lines (stderr), read as they come

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    @property
    def tritonserver(self) -> psutil.Process:
        (triton,) = [p for p in psutil.Process(self.process.pid).children() if "tritonserver" in p.name()]
        return triton

    def stub(self, model: str) -> psutil.Process:
        """The live python-backend stub process of ``model``."""
        script = str(self.repository / model / "1" / "model.py")
        stubs = [p for p in self.tritonserver.children()
                 if p.status() != psutil.STATUS_ZOMBIE and script in p.cmdline()[1:2]]
        assert len(stubs) == 1, f"expected one live stub of {model}, found {stubs}"
        return stubs[0]

    def health_status(self, which: str = "ready") -> int:
        return _status(f"http://127.0.0.1:{self.health}/health/{which}")

    def model_ready(self, model: str) -> bool:
        """Triton's own readiness of one model (KServe v2)."""
        return _status(f"http://127.0.0.1:{self.http}/v2/models/{model}/ready") == 200

    def metric(self, name: str, **labels) -> float:
        """One sample of the health port's metrics page (Triton's page plus mvgen serve's)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/metrics", timeout=10) as response:
            page = response.read().decode()
        wanted = f"{name}{{{','.join(f'{k}={chr(34)}{v}{chr(34)}' for k, v in labels.items())}}}" if labels else name
        (value,) = [line.rpartition(" ")[2] for line in page.splitlines() if line.rpartition(" ")[0] == wanted]
        return float(value)

    def wait_output(self, text: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in line for line in self.output):
                return True
            time.sleep(POLL_S)
        return False


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def start(tiny_cache, work: Path, model: str = "tiny", *extra: str, check=True) -> Supervised:
    """``mvgen serve`` with a health port, its repository in ``work``, small call bounds and the test hooks."""
    reason = _tritonserver_available()
    if reason:
        pytest.skip(reason)
    grpc, http, metrics, health = free_ports(4)
    command = [MVGEN, "serve", "--model", model, "--grpc-port", str(grpc), "--http-port", str(http),
               "--metrics-port", str(metrics), "--health-port", str(health), "--repository", str(work / "repository"),
               "--log-file", str(work / "tritonserver.log"), "--device", "cpu", "--dtype", "float32",
               "--max-tokens", str(MAX_TOKENS), "--call-timeout", str(CALL_TIMEOUT_S), "--test-hooks", *extra]
    process = subprocess.Popen(command, env={**os.environ, "MVGEN_CACHE": str(tiny_cache)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    server = Supervised(process, model, grpc, http, health, work / "repository", work / "tritonserver.log")
    threading.Thread(target=lambda: server.output.extend(iter(process.stderr.readline, "")), daemon=True).start()
    if check and not server.wait_output("mvgen serve: ready", 300):
        stop(server)
        raise RuntimeError(f"mvgen serve {model} not ready: {''.join(server.output)[-2000:]}")
    assert all(server.model_ready(m) for m in SERVED_MODELS[model])
    return server


def stop(server: Supervised) -> int | None:
    """SIGINT, and its exit code (None: it had exited already)."""
    if server.process.poll() is not None:
        return None
    server.process.send_signal(signal.SIGINT)
    return _exit_code(server.process)


def request(images, **changes) -> GenerationInputs:
    first, refs = images
    return GenerationInputs(prompt="a person turns around", first_frame=png(first), references=[png(r) for r in refs],
                            **{**SMALL, **changes})


def t2v_request(images, **changes) -> GenerationInputs:
    _, refs = images
    return GenerationInputs(prompt="a person turns around", references=[png(r) for r in refs], **{**SMALL, **changes})


class InFlight:
    """A long streaming (or unary) request in a thread: its progress, and how it ended and when."""

    def __init__(self, server: Supervised, inputs: GenerationInputs, stream: bool = True):
        self.progress, self.video, self.error, self.ended = [], None, None, None
        self.thread = threading.Thread(target=self._run, args=(server.url, inputs, stream), daemon=True)
        self.thread.start()

    def _run(self, url, inputs, stream):
        try:
            self.video = generate(url, inputs, lambda step, total: self.progress.append(step), stream=stream,
                                  timeout_s=120)
        except ClientError as error:
            self.error = str(error)
        self.ended = time.monotonic()

    def wait_steps(self, steps: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.progress) < steps and self.ended is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.progress) >= steps, f"the request never got going (error: {self.error})"

    def wait_denoising(self, server: "Supervised", loop: str, timeout_s: float = 60) -> None:
        """A unary request streams no progress: wait until its loop has made a few denoiser calls."""
        start = server.metric("mvgen_denoiser_calls_total", model=loop)
        deadline = time.monotonic() + timeout_s
        while server.metric("mvgen_denoiser_calls_total", model=loop) < start + 3 and time.monotonic() < deadline:
            assert self.ended is None, f"the request ended before the fault (error: {self.error})"
            time.sleep(POLL_S)

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        assert self.ended is not None, f"a request in flight was still waiting {timeout_s:.0f} s after the fault"


@dataclass
class Outage:
    not_ready_at: float | None = None  # first moment (monotonic) the health endpoint's readiness was false
    ready_at: float | None = None  # first moment after that it was true again
    model_ready_seen_false: bool = False  # Triton's readiness of the lost model was false at some point
    refusal: str | None = None  # what a request sent during the outage got
    refusal_s: float | None = None  # and how long it waited for it


def watch_outage(server: Supervised, model: str, tensors: dict, loop: str, since: float) -> Outage:
    """Poll readiness from ``since`` (the fault) until it has been false and then true again, within ``RECOVERY_S``;
    the first time it is false, send a request (``tensors``) to ``loop`` and record how it was answered."""
    outage = Outage()
    while time.monotonic() - since < RECOVERY_S:
        ready = server.health_status("ready") == 200
        if not ready and outage.not_ready_at is None:
            outage.not_ready_at = sent = time.monotonic()
            outage.refusal = answer(server, tensors, loop)
            outage.refusal_s = time.monotonic() - sent
        if outage.not_ready_at is not None and not outage.model_ready_seen_false:
            outage.model_ready_seen_false = not server.model_ready(model)
        if ready and outage.not_ready_at is not None:
            outage.ready_at = time.monotonic()
            return outage
        time.sleep(POLL_S)
    return outage


def answer(server: Supervised, tensors: dict, loop: str, parameters: dict | None = None) -> str:
    """Send a request straight to ``loop`` (``mvgen`` unary or ``mvgen_stream``; no readiness check first, as
    ``server.client.generate`` makes): "video" or the error's one line."""
    import queue

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    inputs = infer_inputs(tensors)
    try:
        if loop == "mvgen":
            try:
                client.infer(loop, inputs, parameters=parameters, client_timeout=120)
                return "video"
            except Exception as error:
                return error.message() if hasattr(error, "message") else str(error)
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            client.async_stream_infer(loop, inputs, parameters=parameters)
        except Exception:  # the stream failed as it opened (no server): its error comes through the callback
            pass
        try:
            while True:
                result, error = results.get(timeout=120)
                if error is not None:
                    return error.message()
                if result.as_numpy("video") is not None:
                    return "video"
        finally:
            client.stop_stream(cancel_requests=False)
    finally:
        client.close()


def tree_pss(server: Supervised) -> int:
    from benchmarks.server_memory import tree_pss as pss

    return pss(server.tritonserver.pid)


def fault_request(server: Supervised, inputs: GenerationInputs, fault: str) -> tuple[np.ndarray | None, str | None]:
    """A unary request carrying a test fault (``server.fault_injection``): (video, None) or (None, error line)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    try:
        result = client.infer("mvgen", infer_inputs(inputs.tensors()), parameters={"mvgen_fault": fault},
                              client_timeout=120)
        return result.as_numpy("video"), None
    except Exception as error:
        return None, error.message() if hasattr(error, "message") else str(error)
    finally:
        client.close()
