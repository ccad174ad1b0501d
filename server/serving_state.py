"""What ``mvgen serve``'s supervisor and the served models tell each other, through a directory of small files.

    <dir>/state.json         written by the supervisor (``server.supervisor``): whether the server is draining
                             (SIGTERM: no new requests) and which models are down and why; the loop models read it
                             when a request arrives and refuse it, in one line, when it could not be served
    <dir>/reports/<model>    written by a model that found ``<model>`` dead or hung (a BLS call that failed with
                             "Stub process ... is not healthy" or exceeded its bound, ``server.call_bounds``), or
                             by a parallel denoiser that lost its workers; the supervisor restores the model
    <dir>/in_flight/<model>  written by each loop model: the requests it has accepted and not answered (what a
                             drain waits for; a loop lost with requests in flight needs a whole restart)

Files, not a socket: the models are python-backend stubs that Triton starts and restarts, and a file written by
rename is whole or absent, whoever reads it. The directory lives beside the repository, not in it (Triton would take
a folder of the repository for a model).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

STATE_FILE = "state.json"
REPORTS = "reports"
IN_FLIGHT = "in_flight"


@dataclass(frozen=True)
class ServingState:
    """``draining``: SIGTERM came, new requests are refused; ``down``: model -> why it cannot serve now."""

    draining: bool = False
    down: dict = field(default_factory=dict)

    def refusal(self, needed: tuple[str, ...]) -> str | None:
        """Why a request needing the models ``needed`` cannot be served now (one line), or None."""
        if self.draining:
            return ("the server is shutting down (mvgen serve got SIGTERM) and takes no new requests; "
                    "send the request to another replica")
        for model in needed:
            if model in self.down:
                return f"{model} is being restored ({self.down[model]}); retry in a few seconds"
        return None


@dataclass(frozen=True)
class FaultReport:
    model: str
    reason: str  # one line: what the caller saw
    kill: bool  # the model's process must be killed first (dead or hung); False: it reported its own fault
    at: float  # wall-clock time the failing call started: a report older than the model's restoration is stale


class StateDirectory:
    """One served tree's state directory (``None`` path: no supervisor, every method a no-op that reads empty)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._cache: tuple[tuple, ServingState] | None = None

    def create(self) -> "StateDirectory":
        (self.path / REPORTS).mkdir(parents=True, exist_ok=True)
        (self.path / IN_FLIGHT).mkdir(exist_ok=True)
        self.write_state(ServingState())
        return self

    # --- the supervisor's side ------------------------------------------------------------------------------
    def write_state(self, state: ServingState) -> None:
        _write_atomic(self.path / STATE_FILE, {"draining": state.draining, "down": dict(state.down)})

    def take_reports(self) -> list[FaultReport]:
        """The fault reports written since the last call (each consumed)."""
        if self.path is None:
            return []
        reports = []
        for entry in sorted((self.path / REPORTS).glob("*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                data = json.loads(entry.read_text())
                reports.append(FaultReport(data["model"], data["reason"], bool(data["kill"]), float(data["at"])))
            with contextlib.suppress(OSError):
                entry.unlink()
        return reports

    def in_flight(self, model: str) -> int:
        """What loop model ``model`` last said it has in flight (0 when it never said)."""
        try:
            return int((self.path / IN_FLIGHT / model).read_text())
        except (OSError, ValueError, TypeError):
            return 0

    def clear_in_flight(self, model: str) -> None:
        """``model``'s requests are gone with it (its stub, or the whole server, was replaced)."""
        with contextlib.suppress(OSError):
            (self.path / IN_FLIGHT / model).unlink()

    # --- the models' side -----------------------------------------------------------------------------------
    def read_state(self) -> ServingState:
        """The supervisor's last word (re-read only when the file changed); no directory: serving, nothing down."""
        if self.path is None:
            return ServingState()
        try:
            stat = (self.path / STATE_FILE).stat()
            stamp = (stat.st_ino, stat.st_mtime_ns)  # every write is a new file (rename): a new inode
            if self._cache is None or self._cache[0] != stamp:
                data = json.loads((self.path / STATE_FILE).read_text())
                self._cache = (stamp, ServingState(bool(data.get("draining")), dict(data.get("down", {}))))
            return self._cache[1]
        except (OSError, ValueError):
            return ServingState()

    def report(self, model: str, reason: str, kill: bool, at: float | None = None) -> None:
        """Tell the supervisor that ``model`` is dead or hung (``kill``) or lost its own workers."""
        if self.path is None:
            return
        at = time.time() if at is None else at
        with contextlib.suppress(OSError):
            _write_atomic(self.path / REPORTS / f"{model}.json",
                          {"model": model, "reason": reason, "kill": kill, "at": at})


    def set_in_flight(self, model: str, count: int) -> None:
        """A loop model's requests accepted and not yet answered."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                _write_atomic(self.path / IN_FLIGHT / model, count)


def _write_atomic(path: Path, data) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)
