"""Encoded images that are not what they claim, sent to the real server: each request gets an error naming
the image and the problem, before any sub-model works, and the server stays ready for the next request."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from engine.media import MAX_IMAGE_PIXELS
from server.client import GenerationInputs, generate
from tests.server.conftest import SMALL, png, refusal

SUB_MODELS = ("mvgen_text_encoder", "mvgen_image_encoder", "mvgen_vae", "mvgen_denoiser")


def _claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header (CRC fixed) claims width x height pixels."""
    data = bytearray(png(np.zeros((1, 1, 3), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _request(images) -> GenerationInputs:
    first, refs = images
    return GenerationInputs(prompt="a person turns around", first_frame=png(first),
                            references=[png(r) for r in refs[:2]], **SMALL)


def _encoded(*items: bytes) -> np.ndarray:
    return np.array(list(items), dtype=object)


def _bad_tensors(images, case: str) -> dict:
    first, refs = images
    tensors = _request(images).tensors()
    if case == "truncated png":
        data = png(first)
        tensors["first_frame"] = _encoded(data[: len(data) // 2])
    elif case == "text as first frame":
        tensors["first_frame"] = _encoded(b"a prompt pasted where the image goes\n")
    else:
        tensors["references"] = _encoded(png(refs[0]), _claiming(30_000, 20_000))
    return tensors


CASES = {
    "truncated png": "first frame: cannot read image data as an image (corrupt or truncated?)",
    "text as first frame": "first frame: cannot read image data as an image: it holds text ('a prompt pasted where",
    "oversized reference": f"reference 2: image data has 600000000 pixels, more than the limit of {MAX_IMAGE_PIXELS}",
}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_bad_images_are_refused_and_the_server_stays_ready(served, images, stream):
    client = grpcclient.InferenceServerClient(served.url)
    work_before = {m: served.metric("nv_inference_count", model=m) for m in SUB_MODELS}
    for case, expected in CASES.items():
        message = refusal(client, _bad_tensors(images, case), stream)
        assert expected in message, f"{case}: {message!r}"
        assert "Traceback" not in message, f"{case}: {message!r}"
    assert {m: served.metric("nv_inference_count", model=m) for m in SUB_MODELS} == work_before
    assert client.is_server_ready() and client.is_model_ready("mvgen")
    video = generate(served.url, _request(images), stream=stream)
    assert video.shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)
