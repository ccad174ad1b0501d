"""One denoiser over several processes: a leader (rank 0, in the serving process) and a worker per other rank.

The leader starts its workers (``python -m engine.runtime.workers SPEC``: one per GPU, gloo processes on CPU), each loads
the same expert and joins the process groups of ``engine.runtime.parallel``. Every batch the leader gets, it hands to
all ranks: a small JSON header through the store (which workers poll while idle, so an idle server never
times out) and the tensors by broadcast; every rank then runs the same ``Denoiser.run`` in lockstep (same
calls, same reference caches) and the leader answers with its own result.

Start-up has its own bound, ``start_timeout_s``: a worker imports torch and loads its expert before it joins, which on
a busy host takes longer than a hung collective should be allowed; each worker says it is ready through the store
and only then do the ranks build their process groups (whose connect is bounded by ``timeout_s``).

A worker that dies or hangs fails the batch in flight within ``timeout_s`` (the collectives' timeout) with
``WorkersLost``; from then on the leader refuses every call at once and reports ``healthy`` False, so whoever
serves it restarts it (``server``: the model is reloaded, the server is not ready meanwhile). Workers die with
their leader: they poll its liveness while idle, and a dead leader breaks their collectives.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..checkpoint import Checkpoint
from .denoiser import DenoiseCall, Denoiser
from .parallel import ParallelLayout, connect
from ..warmup import held_modules, make_resident
from ..errors import CollectiveError, WorkersLost

POLL_S = 0.002  # how often an idle worker looks for the next batch in the store (a local round trip)
DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32)}
EXIT_GRACE_S = 2.0  # how long a failed collective waits for a dying worker to be reaped (to name its rank)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs: how to load the checkpoint (``Checkpoint.load_arguments``), which expert, the
    leader's store and the layout."""

    checkpoint: dict
    expert: int
    cache_bytes: int
    sp: int
    cfg_parallel: bool
    port: int
    rank: int
    timeout_s: float
    resident: bool = False  # read the weights in before serving (engine.warmup.make_resident)
    start_timeout_s: float = 600.0  # loading the expert, before the rank joins the groups

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(self.sp, self.cfg_parallel)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """One GPU per rank (rank r on cuda:r of the node); CPU ranks share the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


class DistributedDenoiser:
    """``engine.checkpoint.Denoiser``'s interface (``run``, ``release``) over ``layout.world_size`` processes;
    ``python`` is the interpreter the workers run (a python-backend stub's ``sys.executable`` is not one)."""

    def __init__(self, checkpoint: Checkpoint, expert: int = 0, cache_bytes: int = 8 << 30,
                 layout: ParallelLayout = ParallelLayout(2), timeout_s: float = 120.0,
                 on_lost: Callable[[str], None] = lambda reason: None, python: str = sys.executable,
                 resident_workers: bool = False, start_timeout_s: float = 600.0):
        layout.check_heads(checkpoint.experts[expert].config.num_attention_heads)
        self.layout, self.timeout_s, self.on_lost = layout, timeout_s, on_lost
        self.lost: str | None = None
        self._seq = 0
        self.store = dist.TCPStore("127.0.0.1", 0, layout.world_size, True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=max(timeout_s, start_timeout_s)))
        spec = WorkerSpec(checkpoint.load_arguments(), expert, cache_bytes, layout.sp, layout.cfg_parallel,
                          self.store.port, 0, timeout_s, resident_workers, start_timeout_s)
        self.workers = [_start_worker(WorkerSpec(**{**asdict(spec), "rank": rank}), python)
                        for rank in range(1, layout.world_size)]
        try:
            self.device = rank_device(checkpoint.device, 0)
            self._wait_ready(start_timeout_s)
            self.runtime = connect(layout, 0, self.store, self.device, timeout_s)
            self.denoiser = Denoiser(checkpoint, expert, cache_bytes, parallel=self.runtime)
        except BaseException as error:
            self.close()
            reason = self._exited() or f"{type(error).__name__}: {error}"
            raise WorkersLost(f"the denoiser's workers did not start: {reason}") from None
        self._watch = threading.Thread(target=self._watch_workers, daemon=True, name="mvgen-workers-watch")
        self._watch.start()

    @property
    def healthy(self) -> bool:
        return self.lost is None

    @property
    def caches_references(self) -> bool:
        return self.denoiser.caches_references

    @property
    def caches(self):
        return self.denoiser.caches

    def run(self, calls: list[DenoiseCall], pad_to: int = 0) -> list[torch.Tensor | Exception]:
        """Each call's velocity or its own error, as ``Denoiser.run``; ``WorkersLost`` for the whole batch."""
        self._send("run", [{"key": c.cache_key, "refs": c.cache_references, "inputs": c.inputs} for c in calls],
                   pad_to)
        try:
            return self.denoiser.run(calls, pad_to)
        except CollectiveError as error:
            raise self._lose(f"a collective failed: {error}") from None

    def release(self, cache_key: str) -> None:
        """Drop a request's reference caches on every rank."""
        self._send("release", [{"key": cache_key, "refs": True, "inputs": {}}], 0)
        self.denoiser.release(cache_key)

    def close(self) -> None:
        """Stop the workers (asked first, killed after a grace period); idempotent."""
        if self.lost is None and getattr(self, "runtime", None) is not None:
            try:
                self.store.set(f"op{self._seq}", json.dumps({"op": "stop"}))
            except Exception:  # the store may be gone already; the workers are killed below
                pass
        self.lost = self.lost or "the denoiser was closed"
        deadline = time.monotonic() + 5
        for proc in self.workers:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ---- the leader's side of the protocol ------------------------------------------------------------------
    def _send(self, op: str, calls: list[dict], pad_to: int) -> None:
        if self.lost is not None:
            raise WorkersLost(f"the denoiser's workers are lost ({self.lost}); it is restarting")
        header = {"op": op, "pad_to": pad_to, "calls": [
            {"key": c["key"], "refs": c["refs"], "inputs": {name: None if t is None else [list(t.shape), str(t.dtype)]
                                         for name, t in c["inputs"].items()}} for c in calls]}
        try:
            self.store.set(f"op{self._seq}", json.dumps(header))
            # every op ends in a broadcast, so once it returns every worker has read this op's key
            for c in calls:
                for t in c["inputs"].values():
                    if t is not None:
                        self.runtime.world.broadcast(t.to(self.device).contiguous())
            self.runtime.world.broadcast(torch.tensor([self._seq], device=self.device))
            if self._seq:
                self.store.delete_key(f"op{self._seq - 1}")
        except RuntimeError as error:  # a failed collective (CollectiveError) or store operation
            raise self._lose(f"handing a batch to the workers failed: {error}") from None
        self._seq += 1

    def _wait_ready(self, timeout_s: float) -> None:
        """Until every worker has loaded its expert; a worker that exits meanwhile ends the wait at once."""
        keys, deadline = [f"ready{rank}" for rank in range(1, self.layout.world_size)], time.monotonic() + timeout_s
        while not self.store.check(keys):
            exited = self._exited()
            if exited is not None:
                raise RuntimeError(exited)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers were not ready within {timeout_s:g} s")
            time.sleep(0.05)

    def _lose(self, reason: str) -> WorkersLost:
        # a collective fails as soon as a peer's socket closes, a moment before its process can be reaped: give a
        # dying worker that moment, so the reason names the rank that exited rather than the broken connection
        deadline = time.monotonic() + EXIT_GRACE_S
        while self._exited() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        self._mark_lost(self._exited() or reason)
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
        return WorkersLost(f"the denoiser's workers are lost ({self.lost}); it is restarting")

    def _mark_lost(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            self.on_lost(reason)

    def _exited(self) -> str | None:
        dead = [(rank, proc.poll()) for rank, proc in enumerate(self.workers, 1) if proc.poll() is not None]
        return ", ".join(f"worker rank {rank} exited with code {code}" for rank, code in dead) or None

    def _watch_workers(self) -> None:
        """Notice a worker's death while idle: the next call fails at once instead of at the collective."""
        while self.lost is None:
            reason = self._exited()
            if reason is not None:
                self._mark_lost(reason)
                return
            time.sleep(0.2)


def _start_worker(spec: WorkerSpec, python: str) -> subprocess.Popen:
    # this package's root on the path: a python-backend stub imports it from a path it was told, not site-packages
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    command = [python, "-m", "engine.runtime.workers", json.dumps(asdict(spec))]
    return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills it when the leader's process ends (Linux prctl)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# ---- the worker's side --------------------------------------------------------------------------------------
def _next_op(store, seq: int, leader: int) -> dict:
    key = f"op{seq}"
    while not store.check([key]):
        if os.getppid() != leader:  # the leader is gone
            raise SystemExit(1)
        time.sleep(POLL_S)
    return json.loads(store.get(key))


def _receive(runtime, device, calls: list[dict]) -> list[DenoiseCall]:
    received = []
    for c in calls:
        inputs = {}
        for name, meta in c["inputs"].items():
            if meta is None:
                inputs[name] = None
                continue
            shape, dtype = meta
            inputs[name] = runtime.world.broadcast(torch.empty(shape, dtype=DTYPES[dtype], device=device))
        received.append(DenoiseCall(inputs, c["key"], c["refs"]))
    return received


def worker_main(spec: WorkerSpec) -> int:
    leader = os.getppid()
    torch.set_grad_enabled(False)
    store = dist.TCPStore("127.0.0.1", spec.port, spec.layout.world_size, False,
                          timeout=datetime.timedelta(seconds=max(spec.timeout_s, spec.start_timeout_s)))
    device = rank_device(torch.device(spec.checkpoint.get("device", "cpu")), spec.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    checkpoint = Checkpoint.load(**{**spec.checkpoint, "device": str(device),
                                    "dtype": getattr(torch, spec.checkpoint.get("dtype", "float32"))})
    store.set(f"ready{spec.rank}", "1")
    runtime = connect(spec.layout, spec.rank, store, device, spec.timeout_s)
    denoiser = Denoiser(checkpoint, spec.expert, spec.cache_bytes, parallel=runtime)
    if spec.resident:  # before the leader's warm-up call, which waits for every rank (engine.warmup)
        make_resident(held_modules(denoiser))
    seq = 0
    while True:
        header = _next_op(store, seq, leader)
        if header["op"] == "stop":
            return 0
        calls = _receive(runtime, device, header["calls"])
        runtime.world.broadcast(torch.tensor([seq], device=device))
        if header["op"] == "release":
            denoiser.release(calls[0].cache_key)
        else:  # the results are the leader's to answer with; a failing call fails there too
            denoiser.run(calls, header["pad_to"])
        seq += 1


if __name__ == "__main__":
    sys.exit(worker_main(WorkerSpec(**json.loads(sys.argv[1]))))
