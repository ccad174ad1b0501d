"""End-to-end latency and throughput of the real server at rising concurrency, and the share outside the denoiser.

    mvgen bench server [--model tiny|DIR] [--concurrency 1 2 4 8] [--requests 8] [--steps 8] [--frames 9]
    python -m benchmarks.bench_server [same options]

Starts ``mvgen serve`` (a subprocess on free loopback ports, as ``tests/server/conftest.py`` does), sends
``--warmup`` requests, then for each concurrency level fires ``--requests`` requests (at least as many as the
level) from that many client threads over gRPC (``server.client.generate``): end-to-end latency p50/p95/p99 per
request and throughput (requests / wall time of the level). Triton's own metrics of the denoiser models (``mvgen_denoiser*``), read
before and after each level, give the time the requests spent in the denoiser: its compute
(``nv_inference_compute_infer_duration_us``) and queue (``nv_inference_queue_duration_us``). Triton counts
both per request, so a batch's duration is counted once for each request in it: the same accounting as the
per-request latencies, and ``outside`` = 1 - (compute + queue) / sum of the latencies is the share of a
request's time spent elsewhere (encoders, VAE, the loop's scheduler and guidance, gRPC and BLS transport).
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from engine.cli_args import UsageError, parse_overrides

NAME = "server"
HELP = "end-to-end latency p50/p95/p99 and throughput of the real server at concurrency 1..8 (gRPC)"
RESULTS = "bench_server"
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 120.0
DENOISER_MODEL = "mvgen_denoiser"  # Wan2.2 adds mvgen_denoiser_2: every model named so is counted
# Triton's per-model counters read before and after each level (microseconds or counts)
TRITON_METRICS = {"compute_us": "nv_inference_compute_infer_duration_us",
                  "queue_us": "nv_inference_queue_duration_us",
                  "input_us": "nv_inference_compute_input_duration_us",
                  "output_us": "nv_inference_compute_output_duration_us",
                  "calls": "nv_inference_request_success", "executions": "nv_inference_exec_count"}


@dataclass
class Served:
    """A running ``mvgen serve``: its gRPC address, metrics URL and process."""

    url: str
    metrics_url: str
    process: subprocess.Popen

    def stop(self) -> int:
        """SIGINT (mvgen serve stops tritonserver), then SIGKILL to its process group if it does not exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                return self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()


def start_server(args, log: Path) -> Served:
    """``mvgen serve`` on free loopback ports; returns once it announces that every model is ready."""
    from server.launcher import free_ports

    grpc, http, metrics = free_ports(3)
    command = [sys.executable, "-m", "mvgen", "--cache-dir", str(args.cache_dir), "serve", "--model", str(args.model),
               "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics),
               "--log-file", str(log), "--device", args.device, "--dtype", args.dtype,
               *(["--adapter", str(args.adapter)] if args.adapter else []),
               *(arg for item in args.overrides for arg in ("--set", item))]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    served = Served(f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics", process)
    seen = []
    deadline = time.monotonic() + args.ready_timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line.rstrip())
        if "mvgen serve: ready" in line:
            return served
    served.stop()
    tail = " | ".join(seen[-3:]) or "no output"
    raise UsageError(f"mvgen serve did not become ready ({tail}); log: {log}")


def _pump(stream, lines: queue.Queue) -> None:
    """The server's output lines into ``lines`` (None at its end), so its pipe never fills."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def denoiser_totals(metrics_url: str) -> dict[str, float]:
    """Triton's counters summed over the denoiser models (``model="mvgen_denoiser..."``)."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    totals = dict.fromkeys(TRITON_METRICS, 0.0)
    names = {metric: key for key, metric in TRITON_METRICS.items()}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in names and f'model="{DENOISER_MODEL}' in rest:
            totals[names[name]] += float(line.rpartition(" ")[2])
    return totals


def requests(args, count: int, first_seed: int) -> list:
    import numpy as np

    from server.client import GenerationInputs

    rng = np.random.default_rng(first_seed)
    image = lambda: rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)  # noqa: E731
    first = None if args.t2v else image()
    views = [image() for _ in range(args.refs)]
    return [GenerationInputs(prompt=f"a person turns around {first_seed + i}", first_frame=first, references=views,
                             num_frames=args.frames, height=args.size, width=args.size, steps=args.steps,
                             guidance_scale=args.guidance_scale, seed=first_seed + i) for i in range(count)]


def timed_generate(url: str, request, stream: bool) -> float:
    from server.client import generate

    start = time.perf_counter()
    generate(url, request, stream=stream, timeout_s=600)
    return time.perf_counter() - start


def measure_level(served: Served, concurrency: int, args) -> dict:
    """``--requests`` requests (at least ``concurrency``, so the level is reached) from ``concurrency`` threads:
    latencies, throughput, denoiser time shares."""
    import numpy as np

    batch = requests(args, max(args.requests, concurrency), first_seed=1000 * concurrency)
    before = denoiser_totals(served.metrics_url)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(lambda r: timed_generate(served.url, r, args.stream), batch))
    wall = time.perf_counter() - start
    after = denoiser_totals(served.metrics_url)
    delta = {key: after[key] - before[key] for key in TRITON_METRICS}
    total = sum(latencies)
    compute, waiting = delta["compute_us"] / 1e6, delta["queue_us"] / 1e6
    p50, p95, p99 = (float(np.percentile(latencies, q)) for q in (50, 95, 99))
    return {"concurrency": concurrency, "requests": len(batch), "wall_s": wall, "throughput_rps": len(batch) / wall,
            "p50_s": p50, "p95_s": p95, "p99_s": p99, "mean_s": total / len(batch),
            "denoiser_compute_s": compute, "denoiser_queue_s": waiting,
            "denoiser_calls": delta["calls"], "denoiser_executions": delta["executions"],
            "calls_per_execution": delta["calls"] / delta["executions"] if delta["executions"] else None,
            "compute_share": compute / total, "queue_share": waiting / total,
            "outside_share": 1.0 - (compute + waiting) / total, "triton_deltas": delta, "latencies_s": latencies}


def check(args) -> None:
    from server.launcher import LaunchError, find_tritonserver

    bad = [c for c in args.concurrency if c < 1]
    if bad:
        raise UsageError(f"--concurrency takes positive numbers of client threads, got {bad}")
    for flag, value, least in (("--requests", args.requests, 1), ("--warmup", args.warmup, 0),
                               ("--steps", args.steps, 1), ("--refs", args.refs, 0)):
        if value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    if args.frames < 1 or (args.frames - 1) % 4:
        raise UsageError(f"--frames must be 4k + 1 (1, 5, 9, ...: the Wan VAE's time stride), got {args.frames}")
    if args.size < 16 or args.size % 16:
        raise UsageError(f"--size must be a positive multiple of 16 pixels (VAE /8, patch 2), got {args.size}")
    parse_overrides(args.overrides)
    try:
        find_tritonserver()
    except LaunchError as error:
        raise UsageError(str(error)) from None


def add_arguments(p) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (default) or a diffusers Wan directory")
    p.add_argument("--adapter", type=Path, help="reference-stream adapter (tiny: its own)")
    p.add_argument("--t2v", action="store_true", help="a T2V checkpoint: requests carry no first frame")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="denoiser config override passed to mvgen serve, repeatable")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8], help="client threads (1 2 4 8)")
    p.add_argument("--requests", type=int, default=8,
                   help="requests per concurrency level, at least the level (default 8)")
    p.add_argument("--warmup", type=int, default=1, help="requests before the first level (default 1)")
    p.add_argument("--frames", type=int, default=9, help="video frames, 4k + 1 (default 9)")
    p.add_argument("--size", type=int, default=64, help="video height = width in pixels (default 64)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    p.add_argument("--refs", type=int, default=3, help="reference images (default 3)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--stream", action="store_true", help="the decoupled streaming model (default: unary mvgen)")
    p.add_argument("--device", default="auto", help="the server's device (auto: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for the server")
    p.add_argument("--out", type=Path, default=Path("out/benchmarks"), help=f"directory for {RESULTS}.json/.md")


COLUMNS = [("concurrency", "concurrency"), ("requests", "requests"), ("p50_s", "p50 (s)"), ("p95_s", "p95 (s)"),
           ("p99_s", "p99 (s)"), ("throughput_rps", "throughput (req/s)"),
           ("calls_per_execution", "denoiser calls per execution"), ("compute_share", "denoiser compute share"),
           ("queue_share", "denoiser queue share"), ("outside_share", "outside the denoiser")]


def run(args) -> int:
    from .common import write_results

    check(args)
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / f"{RESULTS}.tritonserver.log").resolve()
    served = start_server(args, log)
    try:
        for request in requests(args, args.warmup, first_seed=0):
            timed_generate(served.url, request, args.stream)
        rows = []
        for concurrency in args.concurrency:
            rows.append(measure_level(served, concurrency, args))
            print(f"  server c={concurrency}: p50 {rows[-1]['p50_s']:.3g} s, {rows[-1]['throughput_rps']:.3g} req/s",
                  file=sys.stderr, flush=True)
    finally:
        code = served.stop()
    config = {"model": str(args.model), "adapter": str(args.adapter) if args.adapter else None,
              "overrides": parse_overrides(args.overrides), "frames": args.frames, "height": args.size,
              "width": args.size, "steps": args.steps, "refs": args.refs, "guidance_scale": args.guidance_scale,
              "requests_per_level": args.requests, "warmup": args.warmup, "stream": args.stream,
              "device": args.device, "dtype": args.dtype, "server_exit_code": code,
              "shares": "Triton's per-request denoiser compute / queue time over the sum of end-to-end latencies",
              "statistic": "percentiles of the per-request end-to-end latencies of each level"}
    print(write_results(RESULTS, rows, COLUMNS, args.out, config))
    return 0


def main(argv=None) -> int:
    from .common import standalone_main

    return standalone_main(sys.modules[__name__], argv, cache_dir=True)


if __name__ == "__main__":
    sys.exit(main())
