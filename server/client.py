"""A gRPC client of the served ``mvgen`` models (``tritonclient.grpc``): build a request, stream its progress.

    frames = generate("127.0.0.1:8001", GenerationInputs(first_frame=Path("f.png"), prompt="..."), on_progress)
"""
from __future__ import annotations

import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import protocol

STREAM_MODEL = "mvgen_stream"
UNARY_MODEL = "mvgen"


class ClientError(RuntimeError):
    """The server refused or failed the request, or cannot be reached (one line)."""


@dataclass
class GenerationInputs:
    """One request; images are paths (sent encoded), bytes, or RGB arrays (sent as pixels)."""

    prompt: str
    first_frame: Path | bytes | np.ndarray
    references: list = field(default_factory=list)
    first_frame_mask: Path | bytes | np.ndarray | None = None
    negative_prompt: str | None = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    shift: float | None = None

    def tensors(self) -> dict[str, np.ndarray]:
        """The request's inputs by contract name (``server.protocol.INPUTS``), unset values left out."""
        out = {"prompt": _texts([self.prompt])}
        if self.negative_prompt is not None:
            out["negative_prompt"] = _texts([self.negative_prompt])
        for name, value in (("first_frame", self.first_frame), ("first_frame_mask", self.first_frame_mask)):
            if value is not None:
                out.update(_image(name, value))
        if self.references:
            if all(isinstance(r, np.ndarray) for r in self.references):
                if len({r.shape for r in self.references}) > 1:
                    raise ClientError("references given as pixels must share one size (references_rgb is "
                                      "[R, H, W, 3]); send them encoded instead")
                out["references_rgb"] = np.stack(self.references).astype(np.uint8)
            else:
                out["references"] = np.array([_encoded(r) for r in self.references], dtype=object)
        for name in protocol.NUMBERS:
            value = getattr(self, name)
            if value is not None:
                out[name] = np.array([value], dtype=_NUMPY[protocol.INPUT_BY_NAME[name].wire_type])
        return out


_NUMPY = {"INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "UINT8": np.uint8}


def _texts(texts: list[str]) -> np.ndarray:
    return np.array([t.encode("utf-8") for t in texts], dtype=object)


def _encoded(value) -> bytes:
    return Path(value).read_bytes() if isinstance(value, (str, Path)) else bytes(value)


def _image(name: str, value) -> dict[str, np.ndarray]:
    if isinstance(value, np.ndarray):
        return {protocol.IMAGE_PAIRS[name]: value}
    return {name: np.array([_encoded(value)], dtype=object)}


def infer_inputs(tensors: dict[str, np.ndarray]):
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array in tensors.items():
        wire = "BYTES" if array.dtype == object else _wire_type(array.dtype)
        item = grpcclient.InferInput(name, list(array.shape), wire)
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def _wire_type(dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)


def _connect(url: str):
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url)
        if not client.is_server_ready():
            raise ClientError(f"the server at {url} is not ready")
    except ClientError:
        raise
    except Exception as error:
        raise ClientError(f"cannot reach an mvgen server at {url}: {_message(error)}") from None
    return client


def _message(error) -> str:
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return (text or type(error).__name__).strip().splitlines()[0]


def generate(url: str, request: GenerationInputs, on_progress: Callable[[int, int], None] | None = None,
             stream: bool = True, timeout_s: float | None = None) -> np.ndarray:
    """Frames uint8 [F, H, W, 3]. ``stream``: the decoupled model, ``on_progress(step, total)`` per step."""
    client = _connect(url)
    inputs = infer_inputs(request.tensors())
    try:
        if not stream:
            try:
                result = client.infer(UNARY_MODEL, inputs, client_timeout=timeout_s)
            except Exception as error:
                raise ClientError(_message(error)) from None
            return result.as_numpy("video")
        return _stream(client, inputs, on_progress, timeout_s)
    finally:
        client.close()


def _stream(client, inputs, on_progress, timeout_s) -> np.ndarray:
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    finished = False
    try:
        client.async_stream_infer(STREAM_MODEL, inputs, enable_empty_final_response=False)
        while True:
            try:
                result, error = results.get(timeout=timeout_s)
            except queue.Empty:
                raise ClientError(f"no response from the server within {timeout_s} s") from None
            if error is not None:
                finished = True
                raise ClientError(_message(error))
            video = result.as_numpy("video")
            if video is not None:
                finished = True
                return video
            progress = result.as_numpy("progress")
            if progress is not None and on_progress is not None:
                on_progress(int(progress[0]), int(progress[1]))
    finally:
        # a finished request closes its stream; an abandoned one (timeout, Ctrl-C) is cancelled on the server
        client.stop_stream(cancel_requests=not finished)
