"""``mvgen_denoiser`` called directly (gRPC, as the loop models call it over BLS), on the server with a cacheable
reference stream: requests sent at once share dynamic batches, yet each gets the velocity it gets alone, and a
request whose reference cache does not exist fails on its own with "reference cache miss".

The oracle is the same server answering each request sent alone (its denoiser pads every batch to the same
rows, so a request's bits cannot depend on its companions), and Triton's own dynamic batcher groups them.
"""
from __future__ import annotations

import queue
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from engine.checkpoint import Checkpoint
from engine.denoiser_io import DENOISER_MODEL_NAME, OUTPUT, config_specs
from engine.errors import MISS_PREFIX
from server.client import infer_inputs
from server.models import CACHE_KEY, RELEASE

SIZES = dict(batch=2, frames=2, height=4, width=4, refs=0, ref_height=4, ref_width=4)  # latent units
ATTEMPTS = 5  # concurrent sends tried until one dynamic batch holds several requests


@pytest.fixture(scope="module")
def specs(tiny_cache):
    cfg = Checkpoint.load("tiny", cache_root=tiny_cache, ref_attention="isolated", ref_timestep="zero").config
    assert cfg.caches_reference
    return config_specs(cfg)


def _tensors(specs, rng: np.random.Generator, **sizes) -> dict[str, np.ndarray]:
    """Random denoiser inputs by name; the timestep travels as one value per row ([B, 1], Triton's batch axis)."""
    out = {s.name: rng.standard_normal(s.shape({**SIZES, **sizes})).astype(np.float32) for s in specs}
    out["timestep"] = rng.uniform(0, 1000, (out["latents"].shape[0], 1)).astype(np.float32)
    return out


def _answer_to(answers: queue.Queue, index: int):
    return lambda result, error: answers.put((index, result, error))


def _send(client, requests: list[tuple[dict, dict | None]]) -> list:
    """Send every (tensors, parameters) at once; each answer, in order: velocity array or error message."""
    answers: queue.Queue = queue.Queue()
    for i, (tensors, parameters) in enumerate(requests):
        client.async_infer(DENOISER_MODEL_NAME, infer_inputs(tensors), _answer_to(answers, i),
                           outputs=[grpcclient.InferRequestedOutput(OUTPUT.name)], parameters=parameters)
    results = [None] * len(requests)
    for _ in requests:
        i, result, error = answers.get(timeout=120)
        results[i] = error.message() if error is not None else result.as_numpy(OUTPUT.name)
    return results


def _multi_request_batches(served) -> float:
    """Denoiser batches so far that held more than one request."""
    return served.metric("mvgen_denoiser_batch_requests_count") - \
        served.metric("mvgen_denoiser_batch_requests_bucket", le="1")


def test_concurrent_requests_share_batches_and_a_cache_miss_fails_alone(served_cached, specs):
    rng = np.random.default_rng(2024)
    client = grpcclient.InferenceServerClient(served_cached.url)
    key = f"test-{uuid.uuid4().hex}"
    # a request's first step: its references build the cache under its key
    first = _tensors(specs, rng, refs=2)
    built = _send(client, [(first, {CACHE_KEY: key})])[0]
    assert isinstance(built, np.ndarray) and built.shape == first["latents"].shape, built
    try:
        requests = {  # all with R = 0 and one shape, so Triton may batch any of them together
            "cached step": (_tensors(specs, rng), {CACHE_KEY: key}),
            "cache miss": (_tensors(specs, rng), {CACHE_KEY: f"never-built-{uuid.uuid4().hex}"}),
            "plain": (_tensors(specs, rng), None),
            "plain, other inputs": (_tensors(specs, rng), None),
        }
        alone = {name: _send(client, [request])[0] for name, request in requests.items()}
        assert isinstance(alone["cache miss"], str) and MISS_PREFIX in alone["cache miss"], alone["cache miss"]
        assert not np.array_equal(alone["cached step"], alone["plain"])
        for _ in range(ATTEMPTS):
            before = _multi_request_batches(served_cached)
            together = dict(zip(requests, _send(client, list(requests.values()))))
            assert isinstance(together["cache miss"], str) and MISS_PREFIX in together["cache miss"], \
                together["cache miss"]
            for name in ("cached step", "plain", "plain, other inputs"):
                assert isinstance(together[name], np.ndarray), f"{name}: {together[name]}"
                assert np.array_equal(together[name], alone[name]), f"{name}: batched differs from alone"
            if _multi_request_batches(served_cached) > before:
                break
        else:
            pytest.fail(f"no denoiser batch held more than one request in {ATTEMPTS} concurrent sends")
        assert served_cached.metric("mvgen_reference_cache_entries", model=DENOISER_MODEL_NAME) == 1
    finally:
        release = _tensors(specs, rng, batch=1, frames=1, height=2, width=2)
        answer = _send(client, [(release, {CACHE_KEY: key, RELEASE: True})])[0]
        client.close()
    assert isinstance(answer, np.ndarray) and answer.size == 0, answer
    assert served_cached.metric("mvgen_reference_cache_entries", model=DENOISER_MODEL_NAME) == 0
