"""Every served model is watched, and a model that dies or hangs is restored through Triton's repository API.

Triton 2.51's python backend neither restarts a dead stub nor reports it: the model stays "ready" while every
request to it fails (triton-inference-server/server#8604). ``ModelSupervisor`` runs in ``mvgen serve`` beside
``tritonserver`` (explicit model control) and takes a model for lost when

- its stub process is gone or a zombie (killed by the kernel's OOM killer, a crash), seen by polling the
  children of ``tritonserver`` every ``WATCH_INTERVAL_S``;
- a caller reports it (``server.serving_state``): the loop's BLS call got "Stub process ... is not healthy" (Triton's
  own health check: a dead or stopped stub) or waited past its bound (``server.call_bounds``: a hung stub), or a
  sequence-parallel denoiser lost its workers.

Then: the model is marked down (the loop models refuse requests that need it, in one line; readiness is false),
its stub is killed if it still runs (a hung one), the model is unloaded and loaded again (a fresh stub; its warm-up
runs, so ready still means warm), and marked up. One exception: a loop model (``mvgen``, ``mvgen_stream``) lost
while it had requests in flight. It answers through response senders, and Triton 2.51's python backend never
completes the requests whose senders died with the stub (their clients would wait forever, and the old model is
never freed); only a new ``tritonserver`` closes their connections, so the whole server is restarted then
(``Server.restart``: the repository is reused, every model loads and warms up again). A failed load is retried
with a growing pause; a model down longer than ``restore_deadline_s`` makes liveness fail, so Kubernetes replaces
the pod. What a lost stub held (a request's reference and context K/V) is rebuilt by the loop, which re-sends a
request's inputs on a cache miss.
"""
from __future__ import annotations

import contextlib
import queue
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import SupervisionMetrics
from .serving_state import ServingState, StateDirectory

WATCH_INTERVAL_S = 0.2
RELOAD, RESTART = "reload", "restart"  # what restores a lost model: its own reload, or a new tritonserver
RETRY_PAUSES_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # between failed restorations of one model (the last one repeats)
UNLOAD_TIMEOUT_S = 90.0
STOPPED_GRACE_S = 0.5  # a stopped stub runs this long (out of any shared mutex) before it is killed


@dataclass
class _Model:
    name: str
    pid: int | None = None  # its stub's process (None: not a python model, or not seen yet)
    down_since: float | None = None  # monotonic time it was marked down; None: serving
    reason: str = ""
    restored_at: float = 0.0  # wall-clock time of its last restoration (older reports are stale)
    failures: list = field(default_factory=list)  # messages of the restoration attempts that failed


class ModelSupervisor:
    """Watches and restores the models of one ``tritonserver`` (``server.launcher.Server``)."""

    def __init__(self, server, models: list[str], load_timeout_s: float, restore_deadline_s: float,
                 metrics: SupervisionMetrics | None = None,
                 log=lambda line: print(line, file=sys.stderr, flush=True)):
        self.server = server  # server.launcher.Server: its process, URLs, repository, state, and restart()
        self.repository = Path(server.repository).resolve()
        self.state: StateDirectory = server.state
        self.models = {name: _Model(name) for name in models}
        self.load_timeout_s = load_timeout_s
        self.restore_deadline_s = restore_deadline_s
        self.metrics = metrics or SupervisionMetrics(models)
        self.log = log
        self.draining = False
        self._lock = threading.Lock()
        self._restore: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._cmdlines: dict[tuple, list[str]] = {}
        self._processes: dict = {}  # pid -> psutil.Process of each live stub _stubs last saw (what _runs asks)
        self._threads = [threading.Thread(target=self._watch, daemon=True, name="mvgen-supervisor-watch"),
                         threading.Thread(target=self._restore_loop, daemon=True, name="mvgen-supervisor-restore")]

    # --- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> "ModelSupervisor":
        """Learn each model's stub (the server is ready: every model is loaded) and start watching."""
        stubs = self._stubs()
        for model in self.models.values():
            model.pid = stubs.get(model.name)
        self._publish()
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._restore.put(None)

    def drain(self) -> None:
        """SIGTERM: no new requests (the loops refuse them), readiness false, no more restorations."""
        with self._lock:
            self.draining = True
        self._publish()

    # --- what the health endpoint asks -----------------------------------------------------------------------
    def down(self) -> dict[str, str]:
        with self._lock:
            return {m.name: m.reason for m in self.models.values() if m.down_since is not None}

    def not_ready_reasons(self) -> list[str]:
        reasons = ["draining: mvgen serve got SIGTERM"] if self.draining else []
        return reasons + [f"{name} is down: {reason}" for name, reason in self.down().items()]

    def not_live_reasons(self) -> list[str]:
        """Models whose restoration has failed for longer than ``restore_deadline_s``."""
        now = time.monotonic()
        with self._lock:
            late = [m for m in self.models.values()
                    if m.down_since is not None and now - m.down_since > self.restore_deadline_s]
            return [f"{m.name} not restored after {now - m.down_since:.0f} s (> {self.restore_deadline_s:.0f} s)"
                    + (f": {m.failures[-1]}" if m.failures else "") for m in late]

    # --- watching ---------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopped.wait(WATCH_INTERVAL_S):
            if not self.server.running():
                return
            if self.server.restarting:
                continue
            try:
                self._check_stubs()
                self._check_reports()
            except Exception as error:  # a bug here must not end supervision
                self.log(f"mvgen serve: supervisor: {type(error).__name__}: {error}")

    def _check_stubs(self) -> None:
        for model in list(self.models.values()):
            if model.down_since is None and model.pid is not None and not self._runs(model.pid):
                self._lost(model.name, f"its process (pid {model.pid}) died", kill=False)

    def _runs(self, pid: int) -> bool:
        """Whether the stub ``_stubs`` saw as ``pid`` still runs: the same process (psutil compares its start time, as
        a pid can be reused) and not a zombie. Each known pid is asked directly, five times a second; listing
        tritonserver's children instead reads every process of the node (~1 ms per 70 processes, each poll)."""
        import psutil

        process = self._processes.get(pid)
        if process is None:  # not among the stubs _stubs last saw: ask it again
            return pid in self._stubs().values()
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def _check_reports(self) -> None:
        for report in self.state.take_reports():
            model = self.models.get(report.model)
            if model is None or model.down_since is not None or report.at < model.restored_at:
                continue  # unknown, already being restored, or about the stub that was replaced since
            self._lost(report.model, report.reason, kill=report.kill)

    def _lost(self, name: str, reason: str, kill: bool) -> None:
        model = self.models[name]
        stranded = self.state.in_flight(name)
        with self._lock:
            model.down_since, model.reason, model.failures = time.monotonic(), reason, []
        self._publish()
        if kill and model.pid is not None:
            self._kill(model)
        if stranded:
            # a loop model answers its requests through response senders that died with its stub: Triton 2.51's
            # python backend never completes them (nor frees the old model), so only a new tritonserver releases them
            self.log(f"mvgen serve: {name} is down ({reason}) with {stranded} request(s) in flight, which Triton "
                     "cannot release: restarting tritonserver")
            self._restore.put((RESTART, name))
        else:
            self.log(f"mvgen serve: {name} is down ({reason}); restoring it")
            self._restore.put((RELOAD, name))

    def _kill(self, model: _Model) -> None:
        """SIGKILL the model's stub, if that pid still is its stub (a pid can be reused). A stopped stub is continued
        first, for a moment: stopped inside one of the shared-memory mutexes it shares with tritonserver and killed
        there, it would leave that mutex owner-dead, and tritonserver 2.51 aborts on it (boost lock_exception)."""
        import psutil

        if self._stubs().get(model.name) != model.pid:
            return
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(model.pid)
            if process.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                process.send_signal(signal.SIGCONT)
                time.sleep(STOPPED_GRACE_S)
            process.send_signal(signal.SIGKILL)

    def _stubs(self) -> dict[str, int]:
        """model name -> pid of its live python-backend stub (a direct child of tritonserver whose command line
        runs ``<repository>/<model>/1/model.py``); dead (zombie) stubs are left out."""
        import psutil

        found, processes = {}, {}
        try:
            children = psutil.Process(self.server.process.pid).children()
        except psutil.NoSuchProcess:
            return found
        for child in children:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                key = (child.pid, child.create_time())  # a pid can be reused; with its start time it is unique
                command = self._cmdlines.get(key) or self._cmdlines.setdefault(key, child.cmdline())
            except psutil.NoSuchProcess:
                continue
            if len(command) > 1 and command[1].endswith("model.py"):
                script = Path(command[1])
                if script.parent.parent.parent == self.repository:
                    found[script.parent.parent.name] = child.pid
                    processes[child.pid] = child
        self._processes = processes  # the live stubs only: a replaced stub's entry goes
        return found

    # --- restoring --------------------------------------------------------------------------------------------
    def _restore_loop(self) -> None:
        while True:
            task = self._restore.get()
            if task is None or self._stopped.is_set():
                return
            action, name = task
            if action == RESTART:
                self._restart(name)
                continue
            model = self.models[name]
            attempt = 0
            while not self._stopped.is_set() and not self.draining and model.down_since is not None:
                started = time.monotonic()
                error = self._reload(name)
                if error is None:
                    self._restored(model, time.monotonic() - started)
                    break
                with self._lock:
                    model.failures.append(error)
                self.log(f"mvgen serve: restoring {name} failed: {error}")
                self._stopped.wait(RETRY_PAUSES_S[min(attempt, len(RETRY_PAUSES_S) - 1)])
                attempt += 1

    def _restart(self, name: str) -> None:
        """Every model down while tritonserver restarts (``Server.restart``), then all up with their new stubs. Not
        while draining: the stop that ends the drain closes the stranded requests' connections anyway."""
        if self.draining:
            return
        started = time.monotonic()
        with self._lock:
            for model in self.models.values():
                if model.down_since is None:
                    model.down_since, model.reason = started, f"tritonserver restarting after {name} was lost"
        self._publish()
        error = self.server.restart()
        if error is not None:  # the server is gone: mvgen serve exits non-zero (serve_forever)
            self.log(f"mvgen serve: restarting tritonserver failed: {error}")
            return
        for model in self.models.values():
            self.state.clear_in_flight(model.name)
        self.metrics.server_restarted()
        stubs = self._stubs()
        for model in self.models.values():
            if model.name == name:
                self._restored(model, time.monotonic() - started)
                continue
            with self._lock:
                model.pid, model.down_since, model.reason, model.failures = stubs.get(model.name), None, "", []
                model.restored_at = time.time()
        self._publish()

    def _reload(self, name: str) -> str | None:
        """Unload, then load ``name`` through the repository API; None, or what failed (one line)."""
        for action, timeout in (("unload", UNLOAD_TIMEOUT_S), ("load", self.load_timeout_s)):
            request = urllib.request.Request(f"{self.server.http_url}/v2/repository/models/{name}/{action}", data=b"{}",
                                             method="POST")
            try:
                urllib.request.urlopen(request, timeout=timeout).close()
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace").strip().replace("\n", " ")
                return f"{action}: HTTP {error.code}: {detail[:300]}"
            except (urllib.error.URLError, OSError) as error:
                return f"{action}: {error}"
        return None

    def _restored(self, model: _Model, seconds: float) -> None:
        pid = self._stubs().get(model.name)
        with self._lock:
            down_for = time.monotonic() - model.down_since
            model.pid, model.down_since, model.reason, model.failures = pid, None, "", []
            model.restored_at = time.time()
        self.metrics.restarted(model.name)
        self._publish()
        self.log(f"mvgen serve: {model.name} restored (down {down_for:.1f} s, reload {seconds:.1f} s)")

    def _publish(self) -> None:
        """The state the loop models read, and the healthy-models gauge."""
        down = self.down()
        self.state.write_state(ServingState(self.draining, down))
        self.metrics.set_healthy(len(self.models) - len(down))
