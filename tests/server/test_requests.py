"""The request contract against the real server: unary and streaming, matching the in-process engine,
and every malformed request refused with an error that names the problem, before any work."""
from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server.client import ClientError, GenerationInputs, generate
from tests.server.conftest import SMALL, png, refusal

SUB_MODELS = ("mvgen_text_encoder", "mvgen_image_encoder", "mvgen_vae", "mvgen_denoiser")


def _request(images, **changes) -> GenerationInputs:
    first, refs = images
    return GenerationInputs(prompt="a person turns around", first_frame=png(first), references=[png(r) for r in refs[:2]],
                            **{**SMALL, **changes})


def test_stream_and_unary_agree_with_the_engine(served, images, tiny_cache):
    from engine.pipeline import MultiViewPipeline
    from engine.tiny import resolve_checkpoint

    progress = []
    streamed = generate(served.url, _request(images), lambda step, total: progress.append((step, total)))
    unary = generate(served.url, _request(images), stream=False)
    assert progress == [(1, SMALL["steps"]), (2, SMALL["steps"])]
    assert streamed.dtype == np.uint8 and streamed.shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)
    assert np.array_equal(streamed, unary)

    first, refs = images
    model, adapter = resolve_checkpoint("tiny", None, tiny_cache)
    pipe = MultiViewPipeline.from_pretrained(model, adapter=adapter, deterministic=True)  # as `served` runs
    local = pipe(first, refs[:2], "a person turns around", **SMALL)
    assert np.array_equal(local, streamed), f"max diff {np.abs(local.astype(int) - streamed.astype(int)).max()}"


def test_raw_pixels_equal_encoded_images(served, images):
    first, refs = images
    encoded = generate(served.url, _request(images, guidance_scale=1.0), stream=False)
    raw = GenerationInputs(prompt="a person turns around", first_frame=first, references=[r for r in refs[:2]],
                           **{**SMALL, "guidance_scale": 1.0})
    with pytest.raises(ClientError, match="references_rgb"):  # two sizes cannot share one [R, H, W, 3] tensor
        generate(served.url, GenerationInputs(prompt="x", first_frame=first, references=[refs[0], first], **SMALL),
                 stream=False)
    same_size = GenerationInputs(prompt="a person turns around", first_frame=first, references=[refs[0], refs[1]],
                                 **{**SMALL, "guidance_scale": 1.0})
    assert np.array_equal(generate(served.url, raw, stream=False), encoded)
    assert np.array_equal(generate(served.url, same_size, stream=False), encoded)


def _tensors(images, **changes) -> dict:
    tensors = _request(images).tensors()
    for name, value in changes.items():
        if value is None:
            tensors.pop(name, None)
        else:
            tensors[name] = value
    return tensors


def _one(value, dtype):
    return np.array([value], dtype=dtype)


MALFORMED = {
    "missing prompt": (dict(prompt=None), "missing input 'prompt'"),
    "missing first frame": (dict(first_frame=None), "first_frame is required: this is an image-to-video model"),
    "wrong dtype": (dict(steps=_one(2.0, np.float32)), "steps"),
    "wrong rank": (dict(first_frame=None, first_frame_rgb=np.zeros((32, 32), np.uint8)), "first_frame_rgb"),
    "undecodable image": (dict(first_frame=np.array([b"not an image"], dtype=object)), "first frame: cannot read"),
    "height not multiple of 16": (dict(height=_one(40, np.int32)), "height must be a positive multiple of 16"),
    "width not multiple of 16": (dict(width=_one(24, np.int32)), "width must be a positive multiple of 16"),
    "frames not 4k+1": (dict(num_frames=_one(6, np.int32)), "frames must be 4k+1"),
    "too many references": (dict(references=np.array([png(np.zeros((8, 8, 3), np.uint8))] * 4, dtype=object)),
                            "at most 3"),
    "steps zero": (dict(steps=_one(0, np.int32)), "steps must be a positive integer"),
    "guidance negative": (dict(guidance_scale=_one(-1.0, np.float32)), "guidance_scale must be a number >= 0"),
    "over the token budget": (dict(num_frames=_one(81, np.int32), height=_one(256, np.int32),
                                   width=_one(256, np.int32)), "more than the limit of 4096"),
    "image given twice": (dict(first_frame_rgb=np.zeros((32, 32, 3), np.uint8)), "not both"),
    "two prompts": (dict(prompt=np.array([b"a", b"b"], dtype=object)), "prompt"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_malformed_requests_are_refused_and_the_server_goes_on(served, images, stream):
    client = grpcclient.InferenceServerClient(served.url)
    work_before = {m: served.metric("nv_inference_count", model=m) for m in SUB_MODELS}
    for case, (changes, expected) in MALFORMED.items():
        start = time.perf_counter()
        message = refusal(client, _tensors(images, **changes), stream)
        assert expected in message, f"{case}: {message!r}"
        assert time.perf_counter() - start < 10, f"{case}: the refusal took too long"
    # refused before any work: no encoder, VAE or denoiser call happened
    assert {m: served.metric("nv_inference_count", model=m) for m in SUB_MODELS} == work_before
    assert client.is_server_ready()
    video = generate(served.url, _request(images), stream=stream)
    assert video.shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)


def test_references_at_their_own_size(served, images):
    """``ref_size``: the references are encoded at 32x48 beside a 32x32 video; a bad size is refused, no work done."""
    video = generate(served.url, _request(images, ref_size=(32, 48)), stream=False)
    assert video.shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)
    client = grpcclient.InferenceServerClient(served.url)
    work_before = {m: served.metric("nv_inference_count", model=m) for m in SUB_MODELS}
    for stream in (False, True):
        message = refusal(client, _tensors(images, ref_size=np.array([32, 40], np.int32)), stream)
        assert "ref_size width must be a positive multiple of 16, got 40" in message, message
    wrong_shape = refusal(client, _tensors(images, ref_size=np.array([32], np.int32)), False)
    assert "ref_size" in wrong_shape  # Triton itself refuses a shape other than the declared [2]
    assert {m: served.metric("nv_inference_count", model=m) for m in SUB_MODELS} == work_before
    assert client.is_server_ready()
