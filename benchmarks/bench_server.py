"""A lone request served vs the same request in process, and the server's latency and throughput under load.

    mvgen bench server [--model tiny|cpu|DIR] [--concurrency 1 2 4 8] [--requests 8] [--repeats 3] [--steps 8]
    python -m benchmarks.bench_server [same options]

1. In process, first (so the two never share the cores): ``engine.MultiViewPipeline`` on the server's checkpoint,
   adapter, ``--set`` overrides, dtype and device, with torch's default threads (as a user of the Python API
   runs it; the served denoiser also keeps torch's default, only the served loop runs on one thread) runs the
   base request (``--frames``, ``--size``, ``--refs``) ``--warmup`` times, then ``--repeats`` times.
2. ``mvgen serve`` (a subprocess on free loopback ports, as ``tests/server/conftest.py`` does) gets the same
   request (prompt, first frame, references, seed, ...) ``--warmup`` then ``--repeats`` times at concurrency 1:
   the ``base`` row, with served p50 / in-process p50 and ``served_equals_in_process`` (every served video equal,
   bit for bit, to the in-process one: the project's contract; the run fails when they differ).
3. With ``--mixed`` (the default) requests cycle through ``shapes``: the base request, one with about half the
   frames and one wider with another reference count, each with its own seed, so the denoiser sees batches of
   mixed shapes. The ``solo`` row runs the mix one request at a time (each shape ``--repeats`` times); each
   level of ``--concurrency`` above 1 fires ``--requests`` (at least the level, rounded up to whole mixes) from
   that many client threads over gRPC (``server.client.generate``). ``vs_solo`` = throughput / the solo row's
   throughput (the same mix served one at a time: 1 / its mean latency).

Every row has end-to-end latency p50/p95/p99 and throughput (requests / wall time), and the denoiser's time from
Triton's own metrics of the denoiser models (``mvgen_denoiser*``), read before and after the row: its compute
(``nv_inference_compute_infer_duration_us``) and queue (``nv_inference_queue_duration_us``). Triton counts both
per request, so a batch's duration is counted once for each request in it: the same accounting as the
per-request latencies, and ``outside`` = 1 - (compute + queue) / sum of the latencies is the share of a
request's time spent elsewhere (encoders, VAE, the loop's scheduler and guidance, gRPC and BLS transport).
Where the server has them (``OPTIONAL_METRICS``), each row also records the loop's queue metrics (change over
the row and peak, polled every second) and the bytes the loop sent to the denoiser per call; absent, None.
"""
from __future__ import annotations

import argparse
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

from engine.cli_args import parse_overrides
from engine.errors import UsageError

NAME = "server"
HELP = ("a lone request served vs in process (same request, bit-identical), and latency/throughput of the real "
        "server at concurrency 2..8 with mixed shapes (gRPC)")
RESULTS = "bench_server"
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 120.0
POLL_S = 1.0  # how often the optional gauges are read during a row
DENOISER_MODEL = "mvgen_denoiser"  # Wan2.2 adds mvgen_denoiser_2: every model named so is counted
# Triton's per-model counters read before and after each row (microseconds or counts)
TRITON_METRICS = {"compute_us": "nv_inference_compute_infer_duration_us",
                  "queue_us": "nv_inference_queue_duration_us",
                  "input_us": "nv_inference_compute_input_duration_us",
                  "output_us": "nv_inference_compute_output_duration_us",
                  "calls": "nv_inference_request_success", "executions": "nv_inference_exec_count"}
# the server's own metrics read where it has them (name prefixes; newer servers): the loop's queue, and the bytes
# and calls the loop sent to the denoiser over BLS
LOOP_QUEUE, INPUT_BYTES, BLS_CALLS = "mvgen_loop_queue", "mvgen_denoiser_input_bytes", "mvgen_denoiser_calls"
OPTIONAL_METRICS = (LOOP_QUEUE, INPUT_BYTES, BLS_CALLS)


@dataclass(frozen=True)
class Shape:
    """One request shape of the mix."""

    name: str
    frames: int
    height: int
    width: int
    refs: int

    def __str__(self) -> str:
        return f"{self.frames}f {self.height}x{self.width} R{self.refs}"


def shapes(args) -> list[Shape]:
    """The base request's shape, then (``--mixed``) one with about half the frames (still 4k + 1) and one 16 pixels
    wider with one reference fewer (one, without references)."""
    base = Shape("base", args.frames, args.size, args.size, args.refs)
    if not args.mixed:
        return [base]
    return [base, Shape("short", 4 * ((args.frames - 1) // 8) + 1, args.size, args.size, args.refs),
            Shape("wide", args.frames, args.size, args.size + 16, args.refs - 1 if args.refs else 1)]


def request_values(args, shape: Shape, seed: int) -> dict:
    """One request's fields (``engine.request.FIELDS``), images drawn from ``seed``: what the server is sent and
    the in-process pipeline is given."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = lambda: rng.integers(0, 256, (shape.height, shape.width, 3), dtype=np.uint8)  # noqa: E731
    return dict(prompt=f"a person turns around {seed}", first_frame=None if args.t2v else image(),
                references=[image() for _ in range(shape.refs)], num_frames=shape.frames, height=shape.height,
                width=shape.width, steps=args.steps, guidance_scale=args.guidance_scale, seed=seed)


class InProcess:
    """``MultiViewPipeline`` in this process on the same checkpoint, dtype, device and overrides as the server
    (torch's default threads, as a user of the Python API runs it). Its timed runs alternate with the served ones
    (``measure_row``'s ``before_each``), one at a time, so the two never share the cores and a drift of the
    machine's speed during the run (other tenants, thermal) falls on both alike."""

    def __init__(self, args, values: dict):
        import torch

        from engine.pipeline import MultiViewPipeline

        self.pipe = MultiViewPipeline.from_pretrained(args.model, args.adapter, dtype=args.dtype, device=args.device,
                                                      cache_root=args.cache_dir, **parse_overrides(args.overrides))
        self.request = self.pipe.make_request(**values)
        self.latencies: list[float] = []
        self.video = None
        self.threads = torch.get_num_threads()
        for _ in range(args.warmup):
            self.video = self.pipe.generate(self.request)

    def run(self) -> float:
        """One timed generation of the base request; its seconds (also kept in ``latencies``)."""
        from .common import time_call

        (seconds,) = time_call(lambda: setattr(self, "video", self.pipe.generate(self.request)), 1, 0)
        self.latencies.append(seconds)
        return seconds

    def fields(self) -> dict:
        from .common import median

        return {"in_process_latencies_s": self.latencies, "in_process_p50_s": median(self.latencies),
                "in_process_threads": self.threads}

    def close(self) -> None:
        import gc

        import torch

        self.pipe = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
               *(["--pad-batch-to", str(args.pad_batch_to)] if args.pad_batch_to is not None else []),
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


def read_metrics(metrics_url: str) -> tuple[dict[str, float], dict[str, float]]:
    """``parse_metrics`` of the server's metrics page."""
    return parse_metrics(urllib.request.urlopen(metrics_url, timeout=5).read().decode())


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """Triton's counters summed over the denoiser models (``model="mvgen_denoiser..."``), and those of the server's
    ``OPTIONAL_METRICS`` it has, each name summed over its labels (histogram buckets left out)."""
    totals = dict.fromkeys(TRITON_METRICS, 0.0)
    names = {metric: key for key, metric in TRITON_METRICS.items()}
    optional: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.split("{", 1)[0].split(" ", 1)[0], float(line.rpartition(" ")[2])
        if name in names and f'model="{DENOISER_MODEL}' in line:
            totals[names[name]] += value
        elif name.startswith(OPTIONAL_METRICS) and not name.endswith("_bucket"):
            optional[name] = optional.get(name, 0.0) + value
    return totals, optional


class QueuePeaks(threading.Thread):
    """The largest value each loop-queue metric (``LOOP_QUEUE``...) took during a row: read before, every
    ``POLL_S`` while it runs (only where the server has such a metric), and after."""

    def __init__(self, metrics_url: str, before: dict[str, float]):
        super().__init__(daemon=True)
        self.metrics_url = metrics_url
        self.peaks: dict[str, float] = {}
        self.finished = threading.Event()
        self.add(before)

    def add(self, optional: dict[str, float]) -> None:
        for name, value in optional.items():
            if name.startswith(LOOP_QUEUE):
                self.peaks[name] = max(value, self.peaks.get(name, value))

    def run(self) -> None:
        while not self.finished.wait(POLL_S):
            try:
                self.add(read_metrics(self.metrics_url)[1])
            except OSError:  # a missed poll loses one sample, not the row
                continue

    def stop(self, after: dict[str, float]) -> dict[str, float]:
        if self.is_alive():
            self.finished.set()
            self.join()
        self.add(after)
        return self.peaks


def optional_fields(before: dict[str, float], after: dict[str, float], peaks: dict[str, float]) -> dict:
    """A row's optional server metrics (None where the server lacks them): each loop-queue metric's change and
    peak (``loop_queue_peak``: the largest, for the table), and the bytes the loop sent to the denoiser over BLS
    per call."""
    change = {name: value - before.get(name, 0.0) for name, value in after.items()}

    def total(prefix: str) -> float | None:
        values = [value for name, value in change.items() if name.startswith(prefix)]
        return sum(values) if values else None

    loop_queue = {name: {"change": change[name], "peak": peaks.get(name)}
                  for name in sorted(change) if name.startswith(LOOP_QUEUE)}
    sent, calls = total(INPUT_BYTES), total(BLS_CALLS)
    tops = [entry["peak"] for entry in loop_queue.values() if entry["peak"] is not None]
    return {"loop_queue": loop_queue or None, "loop_queue_peak": max(tops) if tops else None,
            "denoiser_input_bytes": sent, "denoiser_bls_calls": calls,
            "input_bytes_per_call": sent / calls if sent is not None and calls else None}


def timed_generate(url: str, values: dict, stream: bool):
    """One request to the server: (seconds, video)."""
    from server.client import GenerationInputs, generate

    request = GenerationInputs(**values)
    start = time.perf_counter()
    video = generate(url, request, stream=stream, timeout_s=600)
    return time.perf_counter() - start, video


def measure_row(served: Served, args, kind: str, concurrency: int, batch: list[tuple[Shape, dict]],
                before_each=None):
    """``batch`` (shape, request fields) from ``concurrency`` client threads: the row (latencies, throughput,
    denoiser time shares, the optional server metrics) and the videos, in ``batch``'s order. ``before_each()``
    (concurrency 1 only) runs before each request, its seconds left out of the row's wall time."""
    import numpy as np

    before, optional_before = read_metrics(served.metrics_url)
    peaks = QueuePeaks(served.metrics_url, optional_before)
    if peaks.peaks:
        peaks.start()
    between = []

    def one(item):
        if before_each is not None:
            between.append(before_each())
        return timed_generate(served.url, item[1], args.stream)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, batch))
    wall = time.perf_counter() - start - sum(between)
    after, optional_after = read_metrics(served.metrics_url)
    delta = {key: after[key] - before[key] for key in TRITON_METRICS}
    latencies = [seconds for seconds, _ in results]
    total = sum(latencies)
    compute, waiting = delta["compute_us"] / 1e6, delta["queue_us"] / 1e6
    p50, p95, p99 = (float(np.percentile(latencies, q)) for q in (50, 95, 99))
    names = list(dict.fromkeys(shape.name for shape, _ in batch))
    row = {"kind": kind, "concurrency": concurrency, "shapes": names,
           "shapes_label": f"base: {batch[0][0]}" if names == ["base"] else ", ".join(names),
           "requests": len(batch), "wall_s": wall, "throughput_rps": len(batch) / wall,
           "p50_s": p50, "p95_s": p95, "p99_s": p99, "mean_s": total / len(batch),
           "denoiser_compute_s": compute, "denoiser_queue_s": waiting,
           "denoiser_calls": delta["calls"], "denoiser_executions": delta["executions"],
           "calls_per_execution": delta["calls"] / delta["executions"] if delta["executions"] else None,
           "compute_share": compute / total, "queue_share": waiting / total,
           "outside_share": 1.0 - (compute + waiting) / total, "triton_deltas": delta, "latencies_s": latencies,
           "samples": [{"shape": shape.name, "seed": values["seed"], "latency_s": seconds}
                       for (shape, values), (seconds, _) in zip(batch, results)]}
    row.update(optional_fields(optional_before, optional_after, peaks.stop(optional_after)))
    return row, [video for _, video in results]


def compare(local_video, served_videos: list) -> dict:
    """``served_equals_in_process``: every served video equal, bit for bit, to the in-process one; the largest
    difference in 8-bit levels (None where the shapes differ)."""
    import numpy as np

    same_shape = all(video.shape == local_video.shape for video in served_videos)
    worst = max(int(np.abs(video.astype(np.int16) - local_video.astype(np.int16)).max()) for video in served_videos) \
        if same_shape else None
    return {"served_equals_in_process": worst == 0, "served_max_abs_diff": worst}


def serve_rows(served: Served, args, mix: list[Shape], base: dict, local: InProcess) -> list[dict]:
    """The ``base`` row (its served runs alternating with ``local``'s, whose video they must equal), then, unless
    the videos differ, the ``solo`` row of the mix and one ``level`` row per concurrency above 1."""
    warm = [base] + [request_values(args, shape, seed=10 + i) for i, shape in enumerate(mix[1:])]
    for values in warm * args.warmup:
        timed_generate(served.url, values, args.stream)
    row, videos = measure_row(served, args, "base", 1, [(mix[0], base)] * args.repeats, before_each=local.run)
    fields = local.fields()
    local_video = local.video
    local.close()  # the levels above run the server alone
    row.update(fields, served_over_in_process=row["p50_s"] / fields["in_process_p50_s"], **compare(local_video, videos))
    rows = [row]
    _report(row)
    if not row["served_equals_in_process"]:
        return rows
    levels = [c for c in args.concurrency if c > 1]
    solo = row
    if levels and len(mix) > 1:
        batch = [(shape, request_values(args, shape, seed=100 + i)) for i, shape in enumerate(mix * args.repeats)]
        solo = measure_row(served, args, "solo", 1, batch)[0]
        rows.append(solo)
        _report(solo)
    solo.update(solo_throughput_rps=solo["throughput_rps"], vs_solo=1.0)
    for concurrency in levels:
        count = -(-max(args.requests, concurrency) // len(mix)) * len(mix)  # whole mixes: the solo row's proportions
        batch = [(mix[i % len(mix)], request_values(args, mix[i % len(mix)], seed=1000 * concurrency + i))
                 for i in range(count)]
        level = measure_row(served, args, "level", concurrency, batch)[0]
        level.update(solo_throughput_rps=solo["throughput_rps"],
                     vs_solo=level["throughput_rps"] / solo["throughput_rps"],
                     beats_solo=level["throughput_rps"] >= solo["throughput_rps"])
        rows.append(level)
        _report(level)
    return rows


def _report(row: dict) -> None:
    print(f"  server {row['kind']} c={row['concurrency']}: p50 {row['p50_s']:.3g} s, "
          f"{row['throughput_rps']:.3g} req/s", file=sys.stderr, flush=True)


def checkpoint(args) -> str:
    """``--model``: ``tiny`` as it is, ``cpu`` the CPU-sized checkpoint (``benchmarks.server_memory``, built once
    under ``--cache-dir``/cpu-sized), else the directory given."""
    if args.model != "cpu":
        return str(args.model)
    from engine.tiny import ensure_tiny

    from .server_memory import build_cpu_sized

    return str(build_cpu_sized(ensure_tiny(args.cache_dir), args.cache_dir / "cpu-sized"))


def check(args) -> None:
    from server.launcher import LaunchError, find_tritonserver

    from .common import bench_device

    bad = [c for c in args.concurrency if c < 1]
    if bad:
        raise UsageError(f"--concurrency takes positive numbers of client threads, got {bad}")
    for flag, value, least in (("--requests", args.requests, 1), ("--repeats", args.repeats, 1),
                               ("--warmup", args.warmup, 0), ("--steps", args.steps, 1), ("--refs", args.refs, 0)):
        if value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    if args.frames < 1 or (args.frames - 1) % 4:
        raise UsageError(f"--frames must be 4k + 1 (1, 5, 9, ...: the Wan VAE's time stride), got {args.frames}")
    if args.size < 16 or args.size % 16:
        raise UsageError(f"--size must be a positive multiple of 16 pixels (VAE /8, patch 2), got {args.size}")
    if args.pad_batch_to is not None and args.pad_batch_to < 0:
        raise UsageError(f"--pad-batch-to must be >= 0 rows (0: no padding), got {args.pad_batch_to}")
    parse_overrides(args.overrides)
    args.device = bench_device(args.device)  # one device for both sides, "auto" resolved here
    try:
        find_tritonserver()
    except LaunchError as error:
        raise UsageError(str(error)) from None


def add_arguments(p) -> None:
    p.add_argument("--model", default="tiny",
                   help="'tiny' (default), 'cpu' (tiny encoders and VAE around a 4-layer 768-wide denoiser, built "
                        "once under --cache-dir) or a diffusers Wan directory")
    p.add_argument("--adapter", type=Path, help="reference-stream adapter (tiny: its own)")
    p.add_argument("--t2v", action="store_true", help="a T2V checkpoint: requests carry no first frame")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="denoiser config override for both sides (mvgen serve --set, the pipeline's keywords)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="client threads (1 2 4 8); concurrency 1 (the in-process comparison) is always measured")
    p.add_argument("--requests", type=int, default=8,
                   help="requests per level above 1, at least the level, rounded up to whole mixes (default 8)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of the base request, in process and served, and of each shape solo (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs of each shape before timing, in process and served (default 1)")
    p.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True,
                   help="levels above 1 cycle through the base shape, fewer frames, another size and reference "
                        "count (default on; --no-mixed: the base shape only)")
    p.add_argument("--frames", type=int, default=9, help="video frames of the base request, 4k + 1 (default 9)")
    p.add_argument("--size", type=int, default=64, help="base video height = width in pixels (default 64)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    p.add_argument("--refs", type=int, default=3, help="reference images of the base request (default 3)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--stream", action="store_true", help="the decoupled streaming model (default: unary mvgen)")
    p.add_argument("--pad-batch-to", type=int, help="passed to mvgen serve (default: the server's own default)")
    p.add_argument("--device", default="auto", help="both sides' device (auto: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for the server")
    p.add_argument("--out", type=Path, default=Path("out/benchmarks"), help=f"directory for {RESULTS}.json/.md")


COLUMNS = [("concurrency", "concurrency"), ("shapes_label", "shapes"), ("requests", "requests"),
           ("p50_s", "p50 (s)"), ("p95_s", "p95 (s)"), ("throughput_rps", "throughput (req/s)"),
           ("vs_solo", "vs solo"), ("beats_solo", ">= solo"), ("in_process_p50_s", "in-process p50 (s)"),
           ("served_over_in_process", "served / in-process"), ("calls_per_execution", "denoiser calls per execution"),
           ("compute_share", "denoiser compute"), ("queue_share", "denoiser queue"),
           ("outside_share", "outside the denoiser"), ("loop_queue_peak", "loop queue (peak)"),
           ("input_bytes_per_call", "bytes per denoiser call")]


def run(args) -> int:
    from .common import write_results

    check(args)
    args.model = checkpoint(args)
    args.out.mkdir(parents=True, exist_ok=True)
    mix = shapes(args)
    base = request_values(args, mix[0], seed=0)
    local = InProcess(args, base)  # loaded and warmed before the server starts; timed alternately with it
    served = start_server(args, (args.out / f"{RESULTS}.tritonserver.log").resolve())
    try:
        rows = serve_rows(served, args, mix, base, local)
    finally:
        code = served.stop()
    config = {"model": args.model, "adapter": str(args.adapter) if args.adapter else None,
              "overrides": parse_overrides(args.overrides), "frames": args.frames, "height": args.size,
              "width": args.size, "steps": args.steps, "refs": args.refs, "guidance_scale": args.guidance_scale,
              "shapes": {shape.name: str(shape) for shape in mix}, "mixed": args.mixed, "base_seed": 0,
              "requests_per_level": args.requests, "repeats": args.repeats, "warmup": args.warmup,
              "stream": args.stream, "device": args.device, "dtype": args.dtype,
              "pad_batch_to": args.pad_batch_to, "server_exit_code": code,
              "in_process": "engine.MultiViewPipeline in the benchmark's process, torch's default threads "
                            "(in_process_threads), its timed runs alternating with the served base row's, one at a "
                            "time; the served denoiser keeps torch's default threads too",
              "solo": "the mix's shapes served one at a time (the solo row; the base row without --mixed); "
                      "vs_solo = throughput / its throughput",
              "shares": "Triton's per-request denoiser compute / queue time over the sum of end-to-end latencies",
              "statistic": "percentiles of the per-request end-to-end latencies of each row"}
    print(write_results(RESULTS, rows, COLUMNS, args.out, config))
    if not rows[0]["served_equals_in_process"]:
        print(f"mvgen bench server: FAILED: the served video differs from the in-process one for the same request "
              f"and seed (largest difference {rows[0]['served_max_abs_diff']} levels; None: other shapes); the "
              f"levels above concurrency 1 were not run", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    from .common import standalone_main

    return standalone_main(sys.modules[__name__], argv, cache_dir=True)


if __name__ == "__main__":
    sys.exit(main())
