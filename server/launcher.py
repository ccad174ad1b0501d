"""``mvgen serve``: build the model repository, start ``tritonserver``, wait until it is ready, stop it cleanly.

Where the binary comes from: ``tritonserver`` on ``PATH`` first (the NGC container), else the one inside the
``nvidia-pytriton`` wheel. The wheel keeps the python backend's stub apart from the backend, one stub per
Python version, so a backend directory is assembled for this interpreter. Two things make the stub run
this interpreter's environment (see ``shared/ENVIRONMENT.md``): ``LD_LIBRARY_PATH`` starts with the
interpreter's ``LIBDIR`` (the stub links ``libpython3.X.so``), and ``PATH`` starts with the interpreter's
``bin`` (the embedded interpreter finds its prefix, so the virtualenv and its packages, from ``python3``
on ``PATH``).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .metrics import HEALTH_METRIC
from .repository import RepositoryOptions, build_repository

READY_TIMEOUT_S = 600.0
# glibc's allocator in the served processes: every block from the heap, which is never trimmed on free, so a call's
# activations reuse the pages the previous call faulted in (measured on this project's AMD EPYC, the CPU-sized
# checkpoint's VAE at 17 frames of 128x128: condition + decode 0.5 + 0.9 s against 0.85 + 1.5 s with glibc's
# defaults, which map and unmap each large block). What a request leaves is given back at its end instead
# (server.freed_memory: the denoiser at its release call, the VAE after decoding).
HEAP_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
STOP_TIMEOUT_S = 90.0


class LaunchError(RuntimeError):
    """The server cannot start; the message says why in one line."""


@dataclass(frozen=True)
class Tritonserver:
    binary: Path
    backends: Path | None  # a backend directory to pass, None: the binary's own default
    libs: Path | None  # shared libraries the wheel's binaries need on LD_LIBRARY_PATH


def find_tritonserver() -> Tritonserver:
    """``tritonserver`` on PATH, else the nvidia-pytriton wheel's; ``LaunchError`` when neither exists."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Tritonserver(Path(on_path), None, None)
    try:
        import pytriton
    except ImportError:
        pytriton = None
    if pytriton is not None:
        root = Path(pytriton.__file__).parent / "tritonserver"
        binary = root / "bin" / "tritonserver"
        if binary.is_file():
            return Tritonserver(binary, root / "backends", Path(pytriton.__file__).parents[1] / "nvidia_pytriton.libs")
    raise LaunchError("no tritonserver found: not on PATH and the nvidia-pytriton wheel is not installed "
                      "(pip install 'mvgen[server]', or run inside the NGC tritonserver container)")


def assemble_backends(server: Tritonserver, dest: Path) -> Path | None:
    """For the wheel: ``dest/python`` = the python backend plus the stub built for this Python version."""
    if server.backends is None:
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server.backends.parent / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise LaunchError(f"the nvidia-pytriton wheel has no python backend stub for Python {version} ({stub})")
    python = dest / "python"
    shutil.copytree(server.backends / "python", python, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, python / "triton_python_backend_stub")
    return dest


def server_environment(server: Tritonserver, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    libs = [sysconfig.get_config_var("LIBDIR")] + ([str(server.libs)] if server.libs else [])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for name, value in HEAP_ENVIRONMENT.items():  # a user's own setting wins
        env.setdefault(name, value)
    return env


def check_port_free(host: str, port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise LaunchError(f"port {port} on {host} is already in use ({flag}); choose another") from None
            raise LaunchError(f"cannot listen on {host}:{port} ({flag}): {error.strerror}") from None


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports (each socket stays bound until all are chosen, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    repository: Path | None = None  # default: a temporary directory, removed on exit
    log_file: Path | None = None  # default: tritonserver.log in the work directory
    ready_timeout_s: float = READY_TIMEOUT_S  # for loading; each model's warm-up budget comes on top


class Server:
    """One ``tritonserver`` process over a freshly built repository; a context manager."""

    def __init__(self, options: RepositoryOptions, config: ServeConfig):
        self.options = options
        self.config = config
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self.supervisor: WorkerSupervisor | None = None

    def start(self) -> "Server":
        cfg = self.config
        server = find_tritonserver()
        ports = {"--grpc-port": cfg.grpc_port, "--http-port": cfg.http_port, "--metrics-port": cfg.metrics_port}
        if len(set(ports.values())) != len(ports):
            raise LaunchError(f"the gRPC, HTTP and metrics ports must differ, got {sorted(ports.values())}")
        for flag, port in ports.items():
            check_port_free(cfg.host, port, flag)
        self.workdir = Path(tempfile.mkdtemp(prefix="mvgen-serve-"))
        try:
            repository = build_repository(cfg.repository or self.workdir / "repository", self.options)
            backends = assemble_backends(server, self.workdir / "backends")
        except ValueError as error:  # options the checkpoint refuses (e.g. heads not divisible by --sp)
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise LaunchError(f"cannot serve {self.options.model}: {error}") from None
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self.log_path = cfg.log_file or self.workdir / "tritonserver.log"
        command = [
            str(server.binary), f"--model-repository={repository}", f"--grpc-port={cfg.grpc_port}",
            f"--http-port={cfg.http_port}", f"--metrics-port={cfg.metrics_port}", f"--grpc-address={cfg.host}",
            f"--http-address={cfg.host}", f"--metrics-address={cfg.host}", "--disable-auto-complete-config",
            "--exit-timeout-secs=30", "--pinned-memory-pool-byte-size=0", "--log-verbose=0",
        ]
        if backends is not None:
            command.append(f"--backend-directory={backends}")
        if self.options.parallel.parallel:
            # a parallel denoiser that lost a worker is reloaded through the repository API (WorkerSupervisor),
            # which explicit model control allows; every model is still loaded at start
            command += ["--model-control-mode=explicit", "--load-model=*"]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_environment(server),
                                        start_new_session=True)
        log.close()
        if self.options.parallel.parallel:
            self.supervisor = WorkerSupervisor(self)
            self.supervisor.start()
        return self

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.config.host)}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.config.host)}:{self.config.grpc_port}"

    @property
    def ready_timeout_s(self) -> float:
        """Loading, then the models' warm-up at load (``engine.warmup``; they load and warm up side by side)."""
        warming = self.options.warmup_budget_s if self.options.warmup != "none" else 0.0
        return self.config.ready_timeout_s + warming

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, should_stop=lambda: False) -> bool:
        """Block until ready (True) or until ``should_stop()`` (False); ``LaunchError`` if the server dies."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if should_stop():
                return False
            if self.process.poll() is not None:
                raise LaunchError(f"tritonserver exited with code {self.process.returncode} before it was ready: "
                                  f"{self.failure_reason()} (log: {self.log_path})")
            if self.ready():
                return True
            time.sleep(0.5)
        raise LaunchError(f"tritonserver not ready after {self.ready_timeout_s:.0f} s (log: {self.log_path})")

    def failure_reason(self) -> str:
        """The most telling line of the server log (its first error), for a one-line message."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if line.startswith("E") or "error:" in line.lower()]
        return (errors or lines or ["empty log"])[0].strip()[:400]

    def stop(self) -> int:
        """SIGTERM (Triton drains in-flight requests), SIGKILL after ``STOP_TIMEOUT_S``; the exit code."""
        code = 0
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                code = self.process.wait()
        elif self.process is not None:
            code = self.process.returncode
        if self.process is not None:
            _kill_leftovers(self.process.pid)
        if self.workdir is not None and self.config.log_file is None and code == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def __enter__(self) -> "Server":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class WorkerSupervisor(threading.Thread):
    """Restarts a parallel denoiser whose workers are lost (``server.metrics.WorkerHealth`` reads 0): unload the
    model, so the server reports not-ready (Triton's strict readiness) and no request reaches it, then load it
    again, which starts new workers; ready again once they have joined. Polls the metrics endpoint."""

    INTERVAL_S = 0.5
    PATTERN = re.compile(rf'^{HEALTH_METRIC}{{[^}}]*model="([^"]+)"[^}}]*}} 0(?:\.0)?$', re.M)

    def __init__(self, server: Server):
        super().__init__(daemon=True, name="mvgen-worker-supervisor")
        self.server = server
        self.restarts: list[tuple[str, bool]] = []  # (model, reloaded) in order
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        while not self._stopped.wait(self.INTERVAL_S):
            for model in self.lost_models():
                self.restarts.append((model, self.reload(model)))

    def lost_models(self) -> list[str]:
        url = f"http://{_url_host(self.server.config.host)}:{self.server.config.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return self.PATTERN.findall(response.read().decode("utf-8", "replace"))
        except (urllib.error.URLError, OSError):
            return []

    def reload(self, model: str) -> bool:
        base = f"{self.server.http_url}/v2/repository/models/{model}"
        for action, timeout in (("unload", STOP_TIMEOUT_S), ("load", self.server.ready_timeout_s)):
            request = urllib.request.Request(f"{base}/{action}", data=b"{}", method="POST")
            try:
                urllib.request.urlopen(request, timeout=timeout).close()
            except (urllib.error.URLError, OSError) as error:
                print(f"mvgen serve: restarting {model}'s workers: {action} failed: {error}", file=sys.stderr)
                return False
        return True


def _kill_leftovers(group: int) -> None:
    """Backend stubs outlive a crashed tritonserver; they share its process group (its own session)."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def serve_forever(options: RepositoryOptions, config: ServeConfig, announce=print) -> int:
    """Start, wait for readiness, then run until SIGINT/SIGTERM or until the server dies; the exit code."""
    stop_requested = []

    def on_signal(signum, frame):
        stop_requested.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server = Server(options, config)
    try:
        server.start()
        if not server.wait_ready(lambda: bool(stop_requested)):
            announce("mvgen serve: interrupted before the server was ready")
            server.stop()
            return 130
        announce(f"mvgen serve: ready: gRPC {server.grpc_url}, HTTP {server.http_url}, "
                 f"metrics http://{_url_host(config.host)}:{config.metrics_port}/metrics (log: {server.log_path})")
        while not stop_requested and server.process.poll() is None:
            time.sleep(0.2)
        if not stop_requested:
            raise LaunchError(f"tritonserver exited with code {server.process.returncode}: {server.failure_reason()}")
        announce("mvgen serve: shutting down")
        code = server.stop()
        return 0 if code in (0, -signal.SIGTERM) else code
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
