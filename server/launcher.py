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
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .health import HealthEndpoint, fetch_text, http_ok
from .metrics import SupervisionMetrics
from .repository import GENERATE_MODELS, RepositoryOptions, build_repository
from .serving_state import ServingState, StateDirectory
from .supervisor import ModelSupervisor

READY_TIMEOUT_S = 600.0
# after SIGTERM, how long requests in flight may take to finish (--shutdown-grace); deploy/'s
# terminationGracePeriodSeconds covers it plus tritonserver's own exit (TRITON_EXIT_TIMEOUT_S)
SHUTDOWN_GRACE_S = 120.0
TRITON_EXIT_TIMEOUT_S = 30
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
    health_port: int | None = None  # mvgen serve's own readiness, liveness and metrics (server.health); None: off
    repository: Path | None = None  # default: a temporary directory, removed on exit
    log_file: Path | None = None  # default: tritonserver.log in the work directory
    ready_timeout_s: float = READY_TIMEOUT_S  # for loading; each model's warm-up budget comes on top
    shutdown_grace_s: float = SHUTDOWN_GRACE_S  # after SIGTERM, how long requests in flight may take to finish
    restore_deadline_s: float | None = None  # a model down longer fails liveness; None: the server's ready timeout


class Server:
    """One ``tritonserver`` process over a freshly built repository, its models supervised (``server.supervisor``)
    once ready; a context manager."""

    def __init__(self, options: RepositoryOptions, config: ServeConfig):
        self.options = options
        self.config = config
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self.repository: Path | None = None
        self.state: StateDirectory | None = None
        self.supervisor: ModelSupervisor | None = None
        self.health: HealthEndpoint | None = None
        self.metrics: SupervisionMetrics | None = None
        self.restarting = False  # tritonserver is being restarted (ModelSupervisor): its exit is no failure
        self.stopping = False
        self._lifecycle = threading.Lock()  # a restart's kill and launch, apart from stop()

    def start(self) -> "Server":
        cfg = self.config
        server = find_tritonserver()
        ports = {"--grpc-port": cfg.grpc_port, "--http-port": cfg.http_port, "--metrics-port": cfg.metrics_port}
        if cfg.health_port is not None:
            ports["--health-port"] = cfg.health_port
        if len(set(ports.values())) != len(ports):
            raise LaunchError(f"the {', '.join(ports)} ports must differ, got {sorted(ports.values())}")
        for flag, port in ports.items():
            check_port_free(cfg.host, port, flag)
        self.workdir = Path(tempfile.mkdtemp(prefix="mvgen-serve-"))
        self.state = StateDirectory(self.workdir / "state").create()
        options = replace(self.options, state_dir=str(self.state.path))
        try:
            self.repository = build_repository(cfg.repository or self.workdir / "repository", options)
            backends = assemble_backends(server, self.workdir / "backends")
        except ValueError as error:  # options the checkpoint refuses (e.g. heads not divisible by --sp)
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise LaunchError(f"cannot serve {self.options.model}: {error}") from None
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self.log_path = cfg.log_file or self.workdir / "tritonserver.log"
        # explicit model control (every model still loaded at start): a lost model is unloaded and loaded again
        # through the repository API (server.supervisor)
        self._command = [
            str(server.binary), f"--model-repository={self.repository}", f"--grpc-port={cfg.grpc_port}",
            f"--http-port={cfg.http_port}", f"--metrics-port={cfg.metrics_port}", f"--grpc-address={cfg.host}",
            f"--http-address={cfg.host}", f"--metrics-address={cfg.host}", "--disable-auto-complete-config",
            f"--exit-timeout-secs={TRITON_EXIT_TIMEOUT_S}", "--pinned-memory-pool-byte-size=0", "--log-verbose=0",
            "--model-control-mode=explicit", "--load-model=*",
        ]
        if backends is not None:
            self._command.append(f"--backend-directory={backends}")
        self._environment = server_environment(server)
        self._launch()
        self.metrics = SupervisionMetrics(served_models(self.repository))
        if cfg.health_port is not None:
            self.health = HealthEndpoint(cfg.host, cfg.health_port, self.not_ready_reasons, self.not_live_reasons,
                                         self.metrics_page).start()
        return self

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT, env=self._environment,
                                            start_new_session=True)

    def restart(self) -> str | None:
        """Kill tritonserver and every stub, start it again and wait until it is ready: what releases the requests
        a lost loop model stranded (``server.supervisor``). None, or why it failed (one line)."""
        self.restarting = True
        try:
            with self._lifecycle:  # stop() waits for this, so it never misses the new process
                if self.stopping:
                    return "mvgen serve is stopping"
                self.kill()
                self.process.wait()
                self._launch()
            deadline = time.monotonic() + self.ready_timeout_s
            while not self.ready():
                if self.process.poll() is not None:
                    return f"tritonserver exited with code {self.process.returncode}: {self.failure_reason()}"
                if time.monotonic() > deadline:
                    return f"tritonserver not ready after {self.ready_timeout_s:.0f} s"
                time.sleep(0.5)
            return None
        finally:
            self.restarting = False

    def running(self) -> bool:
        """tritonserver runs, or is being restarted on purpose."""
        return self.restarting or self.process.poll() is None

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.config.host)}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.config.host)}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.config.host)}:{self.config.metrics_port}/metrics"

    @property
    def ready_timeout_s(self) -> float:
        """Loading, then the models' warm-up at load (``engine.warmup``; they load and warm up side by side)."""
        warming = self.options.warmup_budget_s if self.options.warmup != "none" else 0.0
        return self.config.ready_timeout_s + warming

    def ready(self) -> bool:
        """Triton's own readiness (every model loaded)."""
        return http_ok(f"{self.http_url}/v2/health/ready")

    def wait_ready(self, should_stop=lambda: False) -> bool:
        """Block until ready (True; supervision starts) or until ``should_stop()`` (False); ``LaunchError`` if the
        server dies."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if should_stop():
                return False
            if self.process.poll() is not None:
                raise LaunchError(f"tritonserver exited with code {self.process.returncode} before it was ready: "
                                  f"{self.failure_reason()} (log: {self.log_path})")
            if self.ready():
                self.supervisor = ModelSupervisor(
                    self, served_models(self.repository), load_timeout_s=self.ready_timeout_s, metrics=self.metrics,
                    restore_deadline_s=self.config.restore_deadline_s or self.ready_timeout_s).start()
                return True
            time.sleep(0.5)
        raise LaunchError(f"tritonserver not ready after {self.ready_timeout_s:.0f} s (log: {self.log_path})")

    # --- health (server.health) ---------------------------------------------------------------------------------
    def not_ready_reasons(self) -> list[str]:
        if self.supervisor is None:
            return ["starting: the models are loading"]
        reasons = self.supervisor.not_ready_reasons()
        if not reasons and not self.ready():
            reasons.append("tritonserver is not ready")
        return reasons

    def not_live_reasons(self) -> list[str]:
        if not self.running():
            return [f"tritonserver exited with code {self.process.returncode}"]
        if self.supervisor is None:  # starting: Triton's endpoints open once its models have loaded
            return []
        if self.restarting:
            return self.supervisor.not_live_reasons()
        if not http_ok(f"{self.http_url}/v2/health/live", timeout_s=5.0):
            return ["tritonserver does not answer its liveness"]
        return self.supervisor.not_live_reasons()

    def metrics_page(self) -> str:
        return fetch_text(self.metrics_url) + self.metrics.render()

    # --- shutdown -------------------------------------------------------------------------------------------------
    def drain(self) -> None:
        """Refuse new requests (the loop models read the state) and report not-ready; requests in flight go on."""
        if self.supervisor is not None:
            self.supervisor.drain()
        elif self.state is not None:
            self.state.write_state(ServingState(draining=True))

    def in_flight(self) -> int:
        """Requests the loop models have accepted and not answered (``server.serving_state``)."""
        down = self.supervisor.down() if self.supervisor is not None else {}
        return sum(self.state.in_flight(model) for model in GENERATE_MODELS if model not in down)

    def kill(self) -> None:
        """At once: tritonserver and every stub (its process group)."""
        if self.process is not None:
            _kill_leftovers(self.process.pid)

    def failure_reason(self) -> str:
        """The most telling line of the server log (its first error), for a one-line message."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if line.startswith("E") or "error:" in line.lower()]
        return (errors or lines or ["empty log"])[0].strip()[:400]

    def last_error(self) -> str:
        """The last error line of the server log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if line.startswith("E")]
        return (errors or ["no error logged"])[-1].strip()[:400]

    def stop(self) -> int:
        """SIGTERM (Triton drains in-flight requests), SIGKILL after ``STOP_TIMEOUT_S``; the exit code."""
        code = 0
        with self._lifecycle:
            self.stopping = True
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
        if self.health is not None:
            self.health.stop()
            self.health = None
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


def served_models(repository: Path) -> list[str]:
    return sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))


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
    """Start, wait for readiness, then run until SIGINT/SIGTERM or until the server dies; the exit code.

    The first signal drains: new requests are refused and readiness goes false, requests in flight get
    ``config.shutdown_grace_s`` to finish, then tritonserver stops and the exit code is 0 (tritonserver's own exit
    code, when it is not, is announced: it fails to unload an instance a restored model left). A second signal kills
    tritonserver and its models at once (exit code 128 + the signal). tritonserver dying on its own is a
    ``LaunchError`` (exit code 2), so a container restarts.
    """
    signals = []
    server = Server(options, config)

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) > 1:
            server.kill()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        if not server.wait_ready(lambda: bool(signals)):
            announce("mvgen serve: interrupted before the server was ready")
            server.stop()
            return 130
        health = f", health http://{_url_host(config.host)}:{config.health_port}/health/ready" \
            if config.health_port is not None else ""
        announce(f"mvgen serve: ready: gRPC {server.grpc_url}, HTTP {server.http_url}, "
                 f"metrics {server.metrics_url}{health} (log: {server.log_path})")
        while not signals and server.running():
            time.sleep(0.2)
        if not signals:
            raise LaunchError(f"tritonserver exited with code {server.process.returncode}: {server.failure_reason()}")
        _drain(server, config.shutdown_grace_s, signals, announce)
        if len(signals) > 1:
            announce("mvgen serve: second signal: stopped at once")
            return 128 + signals[-1]
        announce("mvgen serve: shutting down")
        code = server.stop()
        if len(signals) > 1:
            return 128 + signals[-1]
        if code not in (0, -signal.SIGTERM):
            # the drain is done; what remains is Triton's own unloading, which waits out its exit timeout and fails
            # when a model instance whose stub died mid-request was left behind (Triton 2.51 never frees those)
            announce(f"mvgen serve: tritonserver exited with code {code} while stopping: {server.last_error()}")
        return 0
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _drain(server: Server, grace_s: float, signals: list, announce) -> None:
    """Stop admission, then wait (at most ``grace_s``) until no request is in flight or a second signal comes."""
    server.drain()
    deadline = time.monotonic() + grace_s
    left = server.in_flight()
    announce(f"mvgen serve: draining: new requests are refused; {left} in flight get up to {grace_s:.0f} s "
             "(a second signal stops at once)")
    while left and len(signals) == 1 and time.monotonic() < deadline and server.running():
        time.sleep(0.2)
        left = server.in_flight()
    if left and len(signals) == 1:
        announce(f"mvgen serve: {left} request(s) still in flight after {grace_s:.0f} s are cut off")
