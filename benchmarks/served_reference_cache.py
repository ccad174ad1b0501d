"""Served reference K/V reuse: per-step time with and without it, from the server's own step-latency metric.

    python -m benchmarks.served_reference_cache [--out out/benchmarks] [--requests 3] [--steps 6]

The CPU-sized checkpoint of ``benchmarks.server_memory`` with an ``isolated`` + ``zero``-timestep reference
stream (the configurations whose reference K/V does not change across steps), served twice by the real
``tritonserver``: reference cache on (the denoiser builds each request's reference K/V at its first step
and reuses it) and off (``--no-reference-cache``: the references go through the reference stream at every
step). The step time is ``mvgen_step_duration_seconds`` (sum / count over the measured requests) of the
``mvgen`` loop model: one denoiser call with cond + uncond batched, guidance and the scheduler step.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from server.client import GenerationInputs, generate
from server.launcher import ServeConfig, Server, free_ports
from server.repository import RepositoryOptions

from .common import median, scrape, write_results
from .server_memory import CPU_SIZED, build_cpu_sized

CACHEABLE = {"ref_attention": "isolated", "ref_timestep": "zero"}
STEP = "mvgen_step_duration_seconds"


def _request(seed: int, steps: int, frames: int, size: int, refs: int) -> GenerationInputs:
    rng = np.random.default_rng(seed)
    image = lambda: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # noqa: E731
    return GenerationInputs(prompt="a person turns around", first_frame=image(), references=[image() for _ in range(refs)],
                            num_frames=frames, height=size, width=size, steps=steps, guidance_scale=5.0, seed=seed)


def measure(model: Path, cache: bool, requests: list[GenerationInputs]) -> dict:
    grpc, http, metrics = free_ports(3)
    config = ServeConfig(grpc_port=grpc, http_port=http, metrics_port=metrics)
    metrics = f"http://127.0.0.1:{config.metrics_port}/metrics"
    # one request at a time: its cond + uncond rows unpadded (padding to the max batch would hide the saving)
    options = RepositoryOptions(model=str(model), adapter=None, device="cpu", overrides=CACHEABLE, reference_cache=cache,
                                pad_batch_to=0)
    with Server(options, config) as server:
        generate(server.grpc_url, requests[0], stream=False, timeout_s=600)  # warm-up
        before = scrape(metrics, f"{STEP}_sum", model="mvgen"), scrape(metrics, f"{STEP}_count", model="mvgen")
        latencies = []
        for request in requests:
            start = time.perf_counter()
            generate(server.grpc_url, request, stream=False, timeout_s=600)
            latencies.append(time.perf_counter() - start)
        after = scrape(metrics, f"{STEP}_sum", model="mvgen"), scrape(metrics, f"{STEP}_count", model="mvgen")
        builds = scrape(metrics, "mvgen_reference_cache_builds_total")
    steps = after[1] - before[1]
    return {"reference_cache": "on" if cache else "off", "steps": int(steps), "step_s": (after[0] - before[0]) / steps,
            "request_s": median(latencies), "cache_builds": int(builds), "latencies_s": latencies}


def main(argv: list[str] | None = None) -> int:
    from engine.tiny import default_cache_root, ensure_tiny

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    parser.add_argument("--cache-dir", type=Path, default=default_cache_root(os.environ))  # an entry point
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--refs", type=int, default=3)
    args = parser.parse_args(argv)
    model = build_cpu_sized(ensure_tiny(args.cache_dir), args.cache_dir / "cpu-sized")
    requests = [_request(i, args.steps, args.frames, args.size, args.refs) for i in range(args.requests)]
    rows = [measure(model, cache, requests) for cache in (True, False)]
    for row in rows:
        row["vs_off"] = row["step_s"] / rows[1]["step_s"]
    config = {"model": "cpu-sized", "denoiser": CPU_SIZED, **CACHEABLE, "frames": args.frames, "height": args.size,
              "width": args.size, "references": args.refs, "steps": args.steps, "guidance_scale": 5.0,
              "requests": args.requests, "statistic": "mean step time over the measured requests (metric sum/count)"}
    print(write_results("served_reference_cache", rows, [
        ("reference_cache", "reference cache"), ("steps", "steps measured"), ("step_s", "step (s)"),
        ("vs_off", "vs off"), ("request_s", "median request (s)"), ("cache_builds", "cache builds"),
    ], args.out, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
