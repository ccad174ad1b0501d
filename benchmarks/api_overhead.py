"""What OpenAI's video API (``mvgen api``) adds to a request over calling Triton's gRPC directly.

    python -m benchmarks.api_overhead [--out benchmarks/results] [--repeats 10] [--poll-ms 10 250]

Starts the real ``tritonserver`` on ``tiny`` (``server.launcher``) and ``mvgen api`` beside it (a subprocess, as it
is deployed), then times the same request, alternately, through both paths, one at a time:

- ``grpc``: ``server.client.generate`` (``mvgen_stream``, streamed) until the frames are in the client;
- ``api``: ``POST /v1/videos`` (multipart: the same PNGs), ``GET /v1/videos/{id}`` every ``--poll-ms`` (a row each)
  until it is completed, then ``GET .../content`` until the MP4 is in the client. Its parts are recorded too: the POST
  (parse, validation with image decoding, SQLite, inputs to disk), the wait, the download, and, from the API's
  own metrics, the job's time in the API's worker (the gRPC call, then the MP4, thumbnail and spritesheet written).
  ``encode_s`` is ``server.api.runner.write_outputs`` of the same frames timed in this process.

Every row: medians over ``--repeats`` after ``--warmup`` of each path, and their minimums; ``overhead_s`` is the
median of each API sample minus the gRPC sample taken just before it; ``load_average_after`` records what else ran.
On a small CPU machine the polling itself competes with the server for the cores (each status request is work for
the API and the client), which the two poll intervals show.
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.tiny import default_cache_root, resolve_checkpoint
from server.client import GenerationInputs, generate
from server.launcher import ServeConfig, Server, free_port, free_ports
from server.repository import RepositoryOptions

from .common import median, scrape, write_results

RESULTS = "api_overhead"
# (frames, size, steps): the small request of the tests, and the tiny model's default request
SHAPES = ((5, 32, 2), (9, 64, 4))


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(size: int, refs: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(1 + refs)]


def _grpc(url: str, images: list[bytes], frames: int, size: int, steps: int) -> tuple[float, np.ndarray]:
    request = GenerationInputs(prompt="a person turns around", first_frame=images[0], references=images[1:],
                               num_frames=frames, height=size, width=size, steps=steps, seed=7)
    start = time.perf_counter()
    video = generate(url, request, stream=True)
    return time.perf_counter() - start, video


def _api(http, images: list[bytes], frames: int, size: int, steps: int, poll_s: float) -> dict:
    files = [("input_reference", ("first.png", images[0], "image/png"))]
    files += [("references", (f"ref{i}.png", image, "image/png")) for i, image in enumerate(images[1:])]
    form = {"prompt": "a person turns around", "size": f"{size}x{size}", "num_frames": str(frames),
            "steps": str(steps), "seed": "7"}
    start = time.perf_counter()
    job = http.post("/v1/videos", data=form, files=files).json()
    posted = time.perf_counter()
    while (status := http.get(f"/v1/videos/{job['id']}").json()["status"]) not in ("completed", "failed"):
        time.sleep(poll_s)
    if status != "completed":
        error = http.get(f"/v1/videos/{job['id']}").json()["error"]
        raise RuntimeError(f"the API failed the job: {error}")
    done = time.perf_counter()
    mp4 = http.get(f"/v1/videos/{job['id']}/content").content
    end = time.perf_counter()
    http.delete(f"/v1/videos/{job['id']}")
    return {"total_s": end - start, "post_s": posted - start, "wait_s": done - posted, "download_s": end - done,
            "mp4_bytes": len(mp4)}


def _encode_s(frames: np.ndarray) -> float:
    from server.api.runner import write_outputs

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_outputs(frames, Path(folder) / "out", 16)
        return time.perf_counter() - start


def _job_seconds(metrics_url: str) -> tuple[float, float]:
    return (scrape(metrics_url, "mvgen_api_job_duration_seconds_sum", outcome="completed"),
            scrape(metrics_url, "mvgen_api_job_duration_seconds_count", outcome="completed"))


def measure(args, model: Path, adapter: Path, work: Path) -> list[dict]:
    import httpx

    grpc, http_port, metrics = free_ports(3)
    options = RepositoryOptions(model=str(model), adapter=str(adapter), device="cpu", dtype="float32")
    rows = []
    with Server(options, ServeConfig(grpc_port=grpc, http_port=http_port, metrics_port=metrics)) as server:
        port = free_port()
        api = subprocess.Popen([sys.executable, "-m", "mvgen", "api", "--url", server.grpc_url, "--port", str(port),
                                "--data-dir", str(work / "api"), "--concurrency", "1"], stderr=subprocess.DEVNULL)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
                _wait_health(http, api)
                for frames, size, steps in SHAPES:
                    rows += _rows(args, server.grpc_url, http, f"http://127.0.0.1:{port}/metrics", frames, size,
                                  steps)
        finally:
            api.send_signal(signal.SIGINT)
            api.wait(120)
    return rows


def _wait_health(http, api: subprocess.Popen) -> None:
    import httpx

    for _ in range(600):
        if api.poll() is not None:
            raise RuntimeError(f"mvgen api exited with {api.returncode}")
        try:
            if http.get("/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("mvgen api not ready after 60 s")


def _rows(args, grpc_url: str, http, metrics_url: str, frames: int, size: int, steps: int) -> list[dict]:
    """One row per ``--poll-ms`` value; the gRPC samples, interleaved with all of them, are shared."""
    images = _images(size, args.refs)
    for _ in range(args.warmup):
        _grpc(grpc_url, images, frames, size, steps)
        _api(http, images, frames, size, steps, args.poll_ms[0] / 1000)
    grpc_samples = []
    api_samples, job_seconds = ({poll: [] for poll in args.poll_ms} for _ in range(2))
    for _ in range(args.repeats):  # interleaved, so every path sees the same drift of a shared machine
        seconds, video = _grpc(grpc_url, images, frames, size, steps)
        grpc_samples.append(seconds)
        for poll in args.poll_ms:
            before = _job_seconds(metrics_url)
            api_samples[poll].append(_api(http, images, frames, size, steps, poll / 1000))
            after = _job_seconds(metrics_url)
            job_seconds[poll].append((after[0] - before[0]) / max(after[1] - before[1], 1))
    grpc_total, encode = median(grpc_samples), median([_encode_s(video) for _ in range(args.repeats)])
    rows = []
    for poll, samples in api_samples.items():
        api_total = median([s["total_s"] for s in samples])
        rows.append({
            "request": f"{frames} frames {size}x{size}, {args.refs} refs, {steps} steps", "poll_ms": poll,
            "grpc_s": grpc_total, "api_s": api_total, "grpc_min_s": min(grpc_samples),
            "api_min_s": min(s["total_s"] for s in samples),
            # each API sample against the gRPC sample just before it: robust to slow drift of a shared machine
            "overhead_s": median([a["total_s"] - g for a, g in zip(samples, grpc_samples)]),
            "overhead_ratio": api_total / grpc_total, "post_s": median([s["post_s"] for s in samples]),
            "wait_s": median([s["wait_s"] for s in samples]), "download_s": median([s["download_s"] for s in samples]),
            "job_s": median(job_seconds[poll]), "encode_s": encode,
            "samples": {"grpc_s": grpc_samples, "api": samples, "job_s": job_seconds[poll]},
            "load_average_after": os.getloadavg(),  # other work on the machine during the row (1, 5, 15 min)
        })
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--refs", type=int, default=2)
    parser.add_argument("--poll-ms", type=float, nargs="+", default=[10.0, 250.0],
                        help="how often the API path asks for the status, one row each (250: what the API advises "
                             "the openai client, openai-poll-after-ms)")
    args = parser.parse_args(argv)
    model, adapter = resolve_checkpoint("tiny", None, default_cache_root(os.environ))  # an entry point: env read here
    with tempfile.TemporaryDirectory(prefix="mvgen-api-bench-") as work:
        rows = measure(args, model, adapter, Path(work))
    config = {"model": "tiny", "dtype": "float32", "device": "cpu", "references": args.refs, "repeats": args.repeats,
              "warmup": args.warmup, "poll_ms": args.poll_ms, "concurrency": 1, "guidance_scale": "model default (5)",
              "statistic": "median over repeats, the two paths interleaved"}
    print(write_results(RESULTS, rows, [
        ("request", "request"), ("poll_ms", "poll (ms)"), ("grpc_s", "gRPC (s)"), ("api_s", "API (s)"),
        ("overhead_s", "API - gRPC, paired (s)"), ("grpc_min_s", "gRPC min (s)"), ("api_min_s", "API min (s)"),
        ("post_s", "POST (s)"), ("wait_s", "until completed (s)"), ("download_s", "download (s)"),
        ("job_s", "job in the API worker (s)"), ("encode_s", "MP4 + PNGs written (s)"),
    ], args.out, config))


if __name__ == "__main__":
    main()
