"""The Triton server behind the API: is it ready, what does it serve, generate one video (gRPC).

What a request may ask is read from the server itself: ``mvgen_stream``'s ``config.pbtxt`` parameters describe
the checkpoint it serves (the repository generator writes them, ``server.models.load_checkpoint`` reads them), so
the API validates a request against the same defaults and limits as the server, in the same words, without a
flag of its own. The checkpoint's JSON files must be readable where the API runs (the same machine or volume);
no weight is read.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from engine.validation import RequestLimits

from ..client import STREAM_MODEL, GenerationInputs, generate

# Wan's frame rate and `mvgen generate --fps`'s default; a checkpoint's mvgen_defaults.json may set "fps"
DEFAULT_FPS = 16
DEFAULT_CONCURRENCY = 8  # `mvgen serve --max-concurrency`'s default, where the server does not say


@dataclass(frozen=True)
class ServedModel:
    """What ``mvgen_stream`` serves: its name for clients, generation defaults, request limits, frame rate, and how
    many requests one instance generates at once."""

    name: str
    defaults: dict
    limits: RequestLimits
    fps: int
    max_concurrency: int


class NotReady(RuntimeError):
    """The Triton server cannot be reached or does not serve ``mvgen_stream`` now (one line)."""


class TritonBackend:
    """One Triton server at ``url`` (gRPC ``HOST:PORT``); thread-safe."""

    def __init__(self, url: str, model_name: str | None = None, fps: int | None = None, timeout_s: float = 5.0):
        self.url, self.model_name, self.fps, self.timeout_s = url, model_name, fps, timeout_s
        self._lock = threading.Lock()
        self._client = None
        self._served: ServedModel | None = None

    def _call(self, method: str, *args, **kwargs):
        import tritonclient.grpc as grpcclient

        with self._lock:
            if self._client is None:
                self._client = grpcclient.InferenceServerClient(self.url)
            client = self._client
        try:
            return getattr(client, method)(*args, client_timeout=self.timeout_s, **kwargs)
        except Exception as error:
            text = error.message() if callable(getattr(error, "message", None)) else str(error)
            raise NotReady(f"cannot reach the Triton server at {self.url}: "
                           f"{(text or type(error).__name__).strip().splitlines()[0]}") from None

    def not_ready_reason(self) -> str | None:
        """None when the server and ``mvgen_stream`` are ready (Triton's own health), else why not."""
        try:
            if not self._call("is_server_ready"):
                return f"the Triton server at {self.url} is not ready"
            if not self._call("is_model_ready", STREAM_MODEL):
                return f"the Triton server at {self.url} does not have {STREAM_MODEL} ready"
        except NotReady as error:
            return str(error)
        return None

    def describe(self) -> ServedModel:
        """The served model (read from the server once, then kept); ``NotReady`` while it cannot be read."""
        if self._served is None:
            config = self._call("get_model_config", STREAM_MODEL, as_json=True)["config"]
            self._served = served_model(config, self.model_name, self.fps)
        return self._served

    def generate(self, values: dict, on_progress: Callable[[int, int], None]) -> np.ndarray:
        """Frames uint8 [F, H, W, 3] of one request (``GenerationInputs``' keywords), streamed from ``mvgen_stream``;
        ``on_progress(step, total)`` per step: an exception it raises cancels the request on the server."""
        return generate(self.url, GenerationInputs(**values), on_progress, stream=True)


def served_model(config: dict, name: str | None, fps: int | None) -> ServedModel:
    """``ServedModel`` from ``mvgen_stream``'s model configuration (Triton's JSON form)."""
    from engine.tiny import VARIANTS

    from ..models import load_checkpoint

    # protobuf's JSON leaves out empty strings; the description only: defaults and limits do not depend on where
    # the weights would run
    params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
    local = {**params, "device": "cpu", "offload": "none"}
    checkpoint = load_checkpoint({**config, "parameters": {k: {"string_value": v} for k, v in local.items()}})
    folder = Path(params["model"]).name
    tiny = [variant for variant, spec in VARIANTS.items() if spec.directory == folder]
    concurrency = params.get("max_concurrency")
    return ServedModel(name=name or (tiny[0] if tiny else folder), defaults=checkpoint.defaults,
                       limits=checkpoint.limits, fps=fps or int(checkpoint.defaults.get("fps", DEFAULT_FPS)),
                       max_concurrency=int(concurrency) if concurrency else DEFAULT_CONCURRENCY)
