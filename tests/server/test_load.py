"""Concurrency against the real server: reproducibility under dynamic batching, cancellation, load, metrics."""
from __future__ import annotations

import queue
import statistics
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server.client import GenerationInputs, generate, infer_inputs
from tests.server.conftest import SMALL, png


def _request(images, refs: int = 1, **changes) -> GenerationInputs:
    first, views = images
    return GenerationInputs(prompt="a person walks", first_frame=png(first), references=[png(v) for v in views[:refs]],
                            **{**SMALL, **changes})


# the target's companions under load: same shape and other seeds (they batch with it), one row instead of two,
# other reference counts, other shapes
OTHERS = [dict(seed=99), dict(seed=5, guidance_scale=1.0), dict(refs=3, height=64, width=48), dict(seed=7, refs=2),
          dict(seed=11, refs=0), dict(seed=13, num_frames=9), dict(seed=17, guidance_scale=3.0)]


# concurrent runs tried until one batched (each checked bit for bit): on a loaded machine four requests may reach the
# denoiser at different steps throughout a run
BATCHING_TRIES = 3


@pytest.mark.parametrize("companions", [1, 3, 7])
def test_same_request_is_bit_identical_alone_and_batched_with_others(served, images, companions):
    """``--deterministic`` (the ``served`` fixture): batches at their real size, the bits from batch-invariant
    kernels, not from padding."""
    target = _request(images, steps=4)
    alone = generate(served.url, target, stream=False)
    others = [_request(images, steps=4, **other) for other in OTHERS[:companions]]
    for _ in range(BATCHING_TRIES):
        batched_before = served.metric("mvgen_denoiser_batch_requests_bucket", le="1")
        batches_before = served.metric("mvgen_denoiser_batch_requests_count")
        with ThreadPoolExecutor(companions + 1) as pool:
            futures = [pool.submit(generate, served.url, r, None, i % 2 == 0) for i, r in enumerate([target, *others])]
            results = [f.result(timeout=240) for f in futures]
        assert np.array_equal(results[0], alone), "the same request and seed changed when batched with others"
        assert not np.array_equal(results[0], results[1])  # rows of different requests never mix
        if companions >= 3:
            assert results[3].shape == (SMALL["num_frames"], 64, 48, 3)
        # the concurrent run did batch: some denoiser batches held more than one request (two requests alone may
        # never meet at the same step)
        if companions < 3:
            return
        multi = (served.metric("mvgen_denoiser_batch_requests_count") - batches_before) - \
            (served.metric("mvgen_denoiser_batch_requests_bucket", le="1") - batched_before)
        if multi > 0:
            return
    pytest.fail(f"no denoiser batch held more than one request in {BATCHING_TRIES} concurrent runs")


def _wait_idle(served, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while served.metric("mvgen_active_requests") > 0:
        assert time.monotonic() < deadline, "requests still active"
        time.sleep(0.05)


def _cancel_stream(served, request: GenerationInputs, after_steps: int) -> int:
    """Start a streaming request, cancel it after ``after_steps`` progress responses; steps the server ran."""
    before = served.metric("mvgen_step_duration_seconds_count", model="mvgen_stream")
    client = grpcclient.InferenceServerClient(served.url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("mvgen_stream", infer_inputs(request.tensors()))
    for _ in range(after_steps):
        result, error = results.get(timeout=60)
        assert error is None, error
    client.stop_stream(cancel_requests=True)
    client.close()
    _wait_idle(served)
    return int(served.metric("mvgen_step_duration_seconds_count", model="mvgen_stream") - before)


def _cancel_unary(served, request: GenerationInputs) -> None:
    client = grpcclient.InferenceServerClient(served.url)
    done: queue.Queue = queue.Queue()
    before = served.metric("mvgen_step_duration_seconds_count", model="mvgen")
    context = client.async_infer("mvgen", infer_inputs(request.tensors()), callback=lambda result, error: done.put(error))
    deadline = time.monotonic() + 60
    while served.metric("mvgen_step_duration_seconds_count", model="mvgen") < before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    context.cancel()
    error = done.get(timeout=30)
    assert error is not None and "cancel" in error.message().lower()
    client.close()
    _wait_idle(served)


@pytest.mark.serial  # timed against the steps of a loaded machine: run alone
def test_cancel_stops_within_one_step_and_leaks_nothing(served, images):
    long = _request(images, steps=40)
    cancelled = lambda: served.metric("mvgen_requests_total", outcome="cancelled")  # noqa: E731
    for _ in range(3):  # warm up: allocator pools, thread pools, gRPC buffers
        _cancel_stream(served, long, after_steps=2)
    baseline = served.tree_rss()
    count = cancelled()
    ran = [_cancel_stream(served, long, after_steps=2) for _ in range(15)]
    for _ in range(5):
        _cancel_unary(served, long)
    # cancelled after 2 streamed steps: at most the step in flight runs on
    assert max(ran) <= 3, f"steps run after cancelling at step 2: {ran}"
    assert cancelled() - count == 20
    growth = served.tree_rss() - baseline
    print(f"\nserver tree RSS: baseline {baseline / 2**20:.0f} MiB, after 20 cancelled requests "
          f"{growth / 2**20:+.1f} MiB")
    assert growth < 48 * 2**20, f"memory grew by {growth / 2**20:.0f} MiB over 20 cancelled requests"
    assert generate(served.url, _request(images), stream=False).shape[0] == SMALL["num_frames"]


def test_client_that_disconnects_is_cancelled(served, images, tmp_path):
    """A client process killed mid-stream: the server notices the closed stream and stops the loop."""
    request_file = tmp_path / "first.png"
    request_file.write_bytes(png(images[0]))
    script = textwrap.dedent(f"""
        import queue, sys
        import tritonclient.grpc as grpcclient
        from server.client import GenerationInputs, infer_inputs
        request = GenerationInputs(prompt="x", first_frame=open({str(request_file)!r}, "rb").read(), num_frames=5,
                                   height=32, width=32, steps=200)
        client = grpcclient.InferenceServerClient({served.url!r})
        results = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put(error))
        client.async_stream_infer("mvgen_stream", infer_inputs(request.tensors()))
        assert results.get(timeout=60) is None
        print("streaming", flush=True)
        sys.stdin.read()
    """)
    count = served.metric("mvgen_requests_total", model="mvgen_stream", outcome="cancelled")
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "streaming"
    child.kill()
    child.wait()
    _wait_idle(served, timeout=60)
    assert served.metric("mvgen_requests_total", model="mvgen_stream", outcome="cancelled") == count + 1


def test_eight_clients_five_requests_each(served, images):
    def client(index: int) -> list[float]:
        latencies = []
        for j in range(5):
            request = _request(images, seed=index * 10 + j, refs=index % 3, guidance_scale=5.0 if j % 2 else 1.0)
            start = time.perf_counter()
            video = generate(served.url, request, stream=bool((index + j) % 2), timeout_s=300)
            latencies.append(time.perf_counter() - start)
            assert video.shape == (SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        latencies = [t for result in pool.map(client, range(8)) for t in result]
    wall = time.perf_counter() - start
    assert len(latencies) == 40
    q = statistics.quantiles(latencies, n=20)
    print(f"\n8 clients x 5 requests ({SMALL['num_frames']} frames {SMALL['height']}x{SMALL['width']}, "
          f"{SMALL['steps']} steps): p50 {statistics.median(latencies):.2f} s, p95 {q[18]:.2f} s, "
          f"wall {wall:.1f} s, {40 / wall:.2f} requests/s")


def test_later_steps_send_the_denoiser_only_the_latents_and_the_timestep(served, images):
    """``inputs_once``: text, CLIP states, condition and references travel at a request's first step; two more
    steps add exactly two (latents, timestep) payloads of the request's rows to the loop's byte counter."""
    sent = []
    for steps in (2, 4):
        before = served.metric("mvgen_denoiser_input_bytes_total"), served.metric("mvgen_denoiser_calls_total")
        generate(served.url, _request(images, steps=steps), stream=False)
        after = served.metric("mvgen_denoiser_input_bytes_total"), served.metric("mvgen_denoiser_calls_total")
        assert after[1] - before[1] == steps
        sent.append(after[0] - before[0])
    frames = (SMALL["num_frames"] - 1) // 4 + 1
    rows = 2  # cond + uncond
    step = rows * 16 * frames * (SMALL["height"] // 8) * (SMALL["width"] // 8) * 4 + rows * 4  # float32 both
    assert sent[1] - sent[0] == 2 * step
    assert sent[0] > 20 * step, "the first step should carry the request's text and image states"
    assert served.metric("mvgen_loop_queue_requests") == 0  # nothing waits once every request is answered


def test_metrics_endpoint_has_triton_and_custom_series(served, images):
    generate(served.url, _request(images), stream=True)
    text = served.metrics()
    for series in ("nv_inference_count", "nv_inference_queue_duration_us", "mvgen_step_duration_seconds_bucket",
                   "mvgen_queue_wait_seconds_bucket", "mvgen_active_requests", "mvgen_requests_total",
                   "mvgen_denoiser_batch_rows_bucket", "mvgen_loop_queue_requests", "mvgen_denoiser_input_bytes_total",
                   "mvgen_denoiser_calls_total"):
        assert series in text, f"{series} missing from /metrics"
    assert served.metric("mvgen_requests_total", outcome="success") > 0
