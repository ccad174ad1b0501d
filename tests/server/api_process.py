"""``mvgen api`` processes against the session's real tritonserver (``served``), for the API tests."""
from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.launcher import free_port
from tests.server.conftest import MVGEN

KEY = "sk-mvgen-test"
START_TIMEOUT_S = 60


@dataclass
class ApiProcess:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    data_dir: Path
    log: Path

    def http(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def openai(self, key: str = KEY):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_api(triton_url: str, data_dir: Path, *extra: str) -> ApiProcess:
    """``mvgen api`` on a free loopback port with the key ``KEY``; returned once ``/health`` says ready."""
    port = free_port()
    key_file = data_dir.parent / f"{data_dir.name}.key"
    key_file.write_text(KEY + "\n")
    log = data_dir.parent / f"{data_dir.name}-{port}.log"
    command = [MVGEN, "api", "--url", triton_url, "--port", str(port), "--data-dir", str(data_dir),
               "--api-key-file", str(key_file), *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    api = ApiProcess(process, f"http://127.0.0.1:{port}", data_dir, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mvgen api exited with {process.returncode}:\n{api.output()}")
        try:
            if httpx.get(f"{api.url}/health", timeout=5).status_code == 200:
                return api
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    api.stop(signal.SIGKILL)
    raise RuntimeError(f"mvgen api not ready after {START_TIMEOUT_S} s:\n{api.output()}")


def wait_for(check, timeout: float = 60, interval: float = 0.05, what: str = "the condition"):
    """Poll ``check()`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def wait_idle(served, timeout: float = 60) -> None:
    """Until the Triton server generates nothing (``mvgen_active_requests`` 0)."""
    wait_for(lambda: served.metric("mvgen_active_requests") == 0, timeout, what="the server to be idle")
