"""Faults a test can ask a served model for, so that the server's fault paths run on a CPU with real processes.

Honoured only when ``mvgen serve --test-hooks`` wrote ``test_hooks: true`` into the models' configs; otherwise the
request parameter is ignored. A request to ``mvgen``/``mvgen_stream`` names one fault in its parameter
``mvgen_fault`` as ``KIND:MODEL:CALL[:MIB]``; the loop passes ``mvgen_fault_call: KIND[:MIB]`` on its ``CALL``-th
call (counting from 1) of that request to ``MODEL``, and that model then:

- ``oom``: runs the call with every module's forward raising ``torch.OutOfMemoryError`` after allocating ``MIB``
  MiB (default 64) in the failing frame, as a forward that runs out of device memory leaves its activations in the
  traceback; the server's handling of a real out-of-memory error then runs unchanged;
- ``hang``: never answers (a deadlock: the stub process stays alive and passes Triton's health checks), which
  only the loop's bounded wait (``server.call_bounds``) can notice.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

FAULT_PARAMETER = "mvgen_fault"  # request parameter of the loop models
CALL_FAULT = "mvgen_fault_call"  # BLS request parameter of the call it applies to
KINDS = ("oom", "hang")
DEFAULT_BALLAST_MB = 64


@dataclass(frozen=True)
class Fault:
    kind: str
    model: str
    call: int
    ballast_mb: int = DEFAULT_BALLAST_MB

    @classmethod
    def parse(cls, text: str) -> "Fault":
        parts = str(text).split(":")
        try:
            kind, model, call, *rest = parts
            fault = cls(kind, model, int(call), int(rest[0]) if rest else DEFAULT_BALLAST_MB)
        except ValueError:
            fault = None
        if fault is None or len(parts) > 4 or fault.kind not in KINDS or fault.call < 1 or fault.ballast_mb < 0:
            raise ValueError(f"{FAULT_PARAMETER} must be KIND:MODEL:CALL[:MIB] with KIND one of {list(KINDS)}, "
                             f"CALL >= 1, got {text!r}")
        return fault

    def call_parameter(self) -> str:
        return f"{self.kind}:{self.ballast_mb}"


def call_fault(value: str | None) -> tuple[str, int] | None:
    """A BLS call's ``mvgen_fault_call`` value -> (kind, ballast MiB); None when absent."""
    if not value:
        return None
    kind, _, mib = str(value).partition(":")
    return kind, int(mib or DEFAULT_BALLAST_MB)


@contextlib.contextmanager
def out_of_memory(ballast_mb: int):
    """Inside, the first module forward of this process allocates ``ballast_mb`` MiB and raises
    ``torch.OutOfMemoryError`` (a global forward pre-hook, removed on exit)."""
    import torch

    def hook(module, args):
        ballast = torch.ones(ballast_mb << 20, dtype=torch.uint8)  # held by this frame, hence by the traceback
        raise torch.OutOfMemoryError(f"test hook: {type(module).__name__} ran out of memory holding "
                                     f"{ballast.numel() >> 20} MiB")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def hang() -> None:
    """Block this thread for good, as a deadlocked call would (the model's process is then killed)."""
    threading.Event().wait()
