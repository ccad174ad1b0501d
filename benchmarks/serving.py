"""Step batching on the served model: throughput of N concurrent requests vs the same N one after another.

    python -m benchmarks.serving [--out out/benchmarks] [--rounds 3] [--concurrency 4] [--steps 8]

Starts the real ``tritonserver`` (``server.launcher``) once per denoiser padding policy: ``padded`` (every
denoiser batch runs at the maximum rows, so results do not depend on batch companions; the default) and
``unpadded`` (batches run at their actual size). Each round sends ``concurrency`` requests sequentially,
then the same requests at once; the denoiser's batch histogram shows how many requests shared a step.
"""
from __future__ import annotations

import argparse
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engine.tiny import default_cache_root, resolve_checkpoint
from server.client import GenerationInputs, generate
from server.launcher import ServeConfig, Server, free_ports
from server.repository import RepositoryOptions

from .common import median, write_results

POLICIES = {"padded": None, "unpadded": 0}


def _requests(count: int, steps: int, size: int, frames: int, refs: int) -> list[GenerationInputs]:
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    views = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(refs)]
    return [GenerationInputs(prompt=f"a person turns around {i}", first_frame=first, references=views, num_frames=frames,
                             height=size, width=size, steps=steps, guidance_scale=5.0, seed=i) for i in range(count)]


def _batch_counts(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the denoiser's requests-per-batch histogram."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        for key in ("sum", "count"):
            if line.startswith(f"mvgen_denoiser_batch_requests_{key}"):
                values[key] = float(line.rsplit(" ", 1)[1])
    return values.get("sum", 0.0), values.get("count", 0.0)


def _timed(url: str, request: GenerationInputs) -> float:
    start = time.perf_counter()
    generate(url, request, stream=False, timeout_s=600)
    return time.perf_counter() - start


def measure(policy: str, requests: list[GenerationInputs], rounds: int, model: Path, adapter: Path) -> list[dict]:
    grpc, http, metrics = free_ports(3)
    config = ServeConfig(grpc_port=grpc, http_port=http, metrics_port=metrics)
    metrics_url = f"http://127.0.0.1:{config.metrics_port}/metrics"
    options = RepositoryOptions(model=str(model), adapter=str(adapter), device="cpu", pad_batch_to=POLICIES[policy])
    samples = {"sequential": [], "concurrent": []}
    with Server(options, config) as server:
        _timed(server.grpc_url, requests[0])  # warm-up: first calls allocate and JIT-free paths settle
        for _ in range(rounds):
            for mode in ("sequential", "concurrent"):
                before = _batch_counts(metrics_url)
                start = time.perf_counter()
                if mode == "sequential":
                    latencies = [_timed(server.grpc_url, r) for r in requests]
                else:
                    with ThreadPoolExecutor(len(requests)) as pool:
                        latencies = list(pool.map(lambda r: _timed(server.grpc_url, r), requests))
                wall = time.perf_counter() - start
                after = _batch_counts(metrics_url)
                per_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                samples[mode].append({"wall_s": wall, "latencies_s": latencies, "requests_per_batch": per_batch})
    rows = []
    for mode, runs in samples.items():
        wall = median([r["wall_s"] for r in runs])
        rows.append({
            "policy": policy, "mode": mode, "requests": len(requests), "wall_s": wall,
            "throughput_rps": len(requests) / wall,
            "latency_s": median([t for r in runs for t in r["latencies_s"]]),
            "requests_per_batch": median([r["requests_per_batch"] for r in runs]), "samples": runs,
        })
    sequential = rows[0]["throughput_rps"]
    for row in rows:
        row["speedup"] = row["throughput_rps"] / sequential
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--refs", type=int, default=3)
    parser.add_argument("--policy", choices=tuple(POLICIES), action="append")
    args = parser.parse_args(argv)
    model, adapter = resolve_checkpoint("tiny", None, default_cache_root(os.environ))  # an entry point: env read here
    requests = _requests(args.concurrency, args.steps, args.size, args.frames, args.refs)
    rows = [row for policy in args.policy or POLICIES for row in measure(policy, requests, args.rounds, model, adapter)]
    config = {"model": "tiny", "concurrency": args.concurrency, "steps": args.steps, "frames": args.frames,
              "height": args.size, "width": args.size, "references": args.refs, "guidance_scale": 5.0,
              "rounds": args.rounds, "statistic": "median over rounds"}
    print(write_results("serving", rows, [
        ("policy", "denoiser batch"), ("mode", "mode"), ("requests", "requests"), ("wall_s", "wall (s)"),
        ("throughput_rps", "throughput (req/s)"), ("latency_s", "median latency (s)"),
        ("requests_per_batch", "requests per denoiser batch"), ("speedup", "vs sequential"),
    ], args.out, config))


if __name__ == "__main__":
    main()
