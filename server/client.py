"""A gRPC client of the served ``mvgen`` models (``tritonclient.grpc``): build a request, stream its progress.

    frames = generate("127.0.0.1:8001", GenerationInputs(first_frame=Path("f.png"), prompt="..."), on_progress)
"""
from __future__ import annotations

import queue
from pathlib import Path
from typing import Callable

import numpy as np

from engine import request as contract

STREAM_MODEL = "mvgen_stream"
UNARY_MODEL = "mvgen"


class ClientError(RuntimeError):
    """The server refused or failed the request, or cannot be reached (one line)."""


class GenerationInputs:
    """One request: keywords named as ``engine.request.FIELDS`` (prompt, first_frame, references, ...; unset
    ones take the server model's defaults). Images are paths (sent encoded), bytes, or RGB arrays (sent as pixels).
    """

    def __init__(self, **values):
        names = [f.name for f in contract.FIELDS]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise TypeError(f"unknown request field(s) {unknown}; the fields are {names}")
        missing = [f.name for f in contract.FIELDS if f.required and values.get(f.name) is None]
        if missing:
            raise TypeError(f"missing required request field(s) {missing}")
        self.values = {name: value for name, value in values.items() if value is not None}

    def __repr__(self) -> str:
        return f"GenerationInputs({', '.join(sorted(self.values))})"

    def tensors(self) -> dict[str, np.ndarray]:
        """The request's inputs by wire name (``server.protocol.INPUTS``), unset values left out."""
        out = {}
        for field in contract.FIELDS:
            if field.name in self.values:
                out.update(_WRITERS[field.kind](field, self.values[field.name]))
        return out


_NUMPY = {"INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "UINT8": np.uint8}


def _texts(texts: list[str]) -> np.ndarray:
    return np.array([t.encode("utf-8") for t in texts], dtype=object)


def _encoded(value) -> bytes:
    return Path(value).read_bytes() if isinstance(value, (str, Path)) else bytes(value)


def _text(field, value) -> dict[str, np.ndarray]:
    return {field.wire[0].name: _texts([value])}


def _numbers(field, value) -> dict[str, np.ndarray]:
    wire = field.wire[0]
    return {wire.name: np.array(value, dtype=_NUMPY[wire.wire_type]).reshape(wire.dims)}


def _image(field, value) -> dict[str, np.ndarray]:
    encoded, pixels = field.wire
    if isinstance(value, np.ndarray):
        return {pixels.name: value}
    return {encoded.name: np.array([_encoded(value)], dtype=object)}


def _images(field, values) -> dict[str, np.ndarray]:
    encoded, pixels = field.wire
    if not values:
        return {}
    if all(isinstance(v, np.ndarray) for v in values):
        if len({v.shape for v in values}) > 1:
            raise ClientError(f"{field.name} given as pixels must share one size ({pixels.name} is "
                              f"[R, H, W, 3]); send them encoded instead")
        return {pixels.name: np.stack(values).astype(np.uint8)}
    return {encoded.name: np.array([_encoded(v) for v in values], dtype=object)}


# how each kind of request field (engine.request.KINDS) becomes tensors
_WRITERS = {"text": _text, "integer": _numbers, "number": _numbers, "numbers": _numbers, "size": _numbers,
            "image": _image, "images": _images, "frames": _images}


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
