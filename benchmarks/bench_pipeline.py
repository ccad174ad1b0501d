"""Where a generation's time goes in the in-process pipeline: encode, denoise, decode.

    mvgen bench pipeline [--config tiny cpu] [--frames 17] [--size 128] [--steps 10] [--refs 3] [--repeats 3]
    python -m benchmarks.bench_pipeline [same options]

Runs ``engine.generation``'s loop (what ``MultiViewPipeline.generate`` runs) over the pipeline's own stages
wrapped in ``TimedStages``, which times every stage call, synchronised with the device: the once-per-request
encoders (umT5 text, CLIP image, VAE encode of the first-frame condition and of the references), each denoiser
call, and the VAE decode. ``loop`` is the whole denoising loop (denoiser calls plus guidance and scheduler
steps); ``other`` is what the stages do not account for (image fitting, noise, scheduler set-up, guidance,
scheduler steps). Medians over ``--repeats`` generations after ``--warmup``.

Sizes: ``tiny`` is the embedded checkpoint with its bundled adapter. ``cpu`` is the CPU-sized checkpoint of
``benchmarks.server_memory`` (the tiny encoders and VAE around a 4-layer, 768-wide Wan2.1-I2V denoiser): a pipeline
needs encoders whose widths match the denoiser's context widths, so its denoiser reads the tiny encoders' 32-wide
states rather than Wan's 4096 (umT5) and 1280 (CLIP) of ``bench denoiser --config cpu``.
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

from engine.cli_args import add_memory_arguments, memory_options, parse_overrides
from engine.errors import UsageError

NAME = "pipeline"
HELP = "a generation's time split into encode / denoise / decode (in-process pipeline, stages timed)"
RESULTS = "bench_pipeline"
CONFIGS = {"tiny": "the embedded tiny checkpoint with its adapter",
           "cpu": "tiny encoders and VAE + a 4-layer 768-wide denoiser (benchmarks.server_memory's CPU-sized)"}
ENCODERS = ("encode_text", "encode_image", "encode_condition", "encode_references")
PHASES = (*ENCODERS, "denoise", "decode")


class TimedStages:
    """``engine.generation.Stages`` over another stages object: every call of ``PHASES`` is timed (device
    synchronised before and after) into ``seconds[phase]``; everything else passes through unchanged."""

    def __init__(self, stages, sync):
        self._stages = stages
        self._sync = sync
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def __getattr__(self, name):
        value = getattr(self._stages, name)
        if name not in PHASES:
            return value

        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            out = value(*args, **kwargs)
            self._sync()
            self.seconds[name].append(time.perf_counter() - start)
            return out

        return timed


def load_pipeline(config: str, args):
    from engine.pipeline import MultiViewPipeline
    from engine.tiny import ensure_tiny

    from .server_memory import build_cpu_sized

    model = "tiny" if config == "tiny" else build_cpu_sized(ensure_tiny(args.cache_dir), args.cache_dir / "cpu-sized")
    return MultiViewPipeline.from_pretrained(model, device=args.device, cache_root=args.cache_dir,
                                             reference_cache=args.reference_cache, **memory_options(args),
                                             **parse_overrides(args.overrides))


def request(pipe, args, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    image = lambda: rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)  # noqa: E731
    first = image() if pipe.config.task == "i2v" else None
    return pipe.make_request(first_frame=first, references=[image() for _ in range(args.refs)],
                             prompt="a person turns around, showing the back of the jacket", num_frames=args.frames,
                             height=args.size, width=args.size, steps=args.steps,
                             guidance_scale=args.guidance_scale, seed=seed)


def generate_timed(pipe, req, sync) -> dict:
    """One generation through ``TimedStages``: each stage's seconds, and the walls of prepare / loop / decode."""
    from engine import generation

    stages = TimedStages(pipe.stages, sync)
    sync()
    start = time.perf_counter()
    state = generation.prepare(pipe.checkpoint, req, stages)
    sync()
    prepared = time.perf_counter()
    latents = generation.denoise(state, stages)
    sync()
    looped = time.perf_counter()
    stages.decode(latents)
    end = time.perf_counter()
    return {"stages": dict(stages.seconds), "prepare_s": prepared - start, "loop_s": looped - prepared,
            "total_s": end - start}


def summarise(config: str, runs: list[dict], args) -> dict:
    """One table row: per-phase medians over the runs (and the raw runs)."""
    import numpy as np

    def med(values):
        return float(np.median(values)) if values else 0.0

    per_run = defaultdict(list)
    for run_ in runs:
        for phase in PHASES:
            per_run[phase].append(sum(run_["stages"].get(phase, [])))
        for key in ("prepare_s", "loop_s", "total_s"):
            per_run[key].append(run_[key])
    calls = [t for run_ in runs for t in run_["stages"].get("denoise", [])]
    row = {"config": config, "frames": args.frames, "size": f"{args.size}x{args.size}", "refs": args.refs,
           "steps": args.steps, "denoiser_calls": len(runs[0]["stages"].get("denoise", [])),
           "text_s": med(per_run["encode_text"]), "image_s": med(per_run["encode_image"]),
           "vae_encode_s": med([a + b for a, b in zip(per_run["encode_condition"], per_run["encode_references"])]),
           "denoise_s": med(per_run["denoise"]), "step_s": med(calls), "loop_s": med(per_run["loop_s"]),
           "decode_s": med(per_run["decode"]), "total_s": med(per_run["total_s"]), "runs": runs}
    row["encode_s"] = row["text_s"] + row["image_s"] + row["vae_encode_s"]
    row["other_s"] = row["total_s"] - row["encode_s"] - row["denoise_s"] - row["decode_s"]
    row["denoise_share"] = row["denoise_s"] / row["total_s"]
    return row


def measure(config: str, args) -> dict:
    import torch

    from .common import peak_rss_bytes

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    pipe = load_pipeline(config, args)
    for i in range(args.warmup):
        generate_timed(pipe, request(pipe, args, seed=1000 + i), sync)
    runs = [generate_timed(pipe, request(pipe, args, seed=i), sync) for i in range(args.repeats)]
    print(f"  pipeline {config}: {runs[-1]['total_s']:.3g} s per generation", file=sys.stderr, flush=True)
    row = summarise(config, runs, args)
    # CUDA: the allocator's peak; CPU: this process's peak RSS (Linux KiB), which spans every config measured before
    # in the process: run one config per process to compare memory options
    row["peak_mib"] = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                       else peak_rss_bytes() / 2**20)
    row["peak_kind"] = "CUDA max allocated" if cuda else "process peak RSS"
    row.update(dtype=str(pipe.checkpoint.dtype).removeprefix("torch."), offload=args.offload,
               vae_tiling="on" if args.vae_tiling else "off")
    return row


def check(args) -> None:
    from .common import bench_device

    args.device = bench_device(args.device)
    for flag, value, least in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                               ("--steps", args.steps, 1), ("--refs", args.refs, 0)):
        if value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    if args.frames < 1 or (args.frames - 1) % 4:
        raise UsageError(f"--frames must be 4k + 1 (1, 5, 9, ...: the Wan VAE's time stride), got {args.frames}")
    if args.size < 16 or args.size % 16:
        raise UsageError(f"--size must be a positive multiple of 16 pixels (VAE /8, patch 2), got {args.size}")
    parse_overrides(args.overrides)


def add_arguments(p) -> None:
    p.add_argument("--config", nargs="+", choices=tuple(CONFIGS), default=["tiny"],
                   help="; ".join(f"{k}: {v}" for k, v in CONFIGS.items()) + " (default tiny)")
    p.add_argument("--frames", type=int, default=17, help="video frames, 4k + 1 (default 17)")
    p.add_argument("--size", type=int, default=128, help="video height = width in pixels (default 128)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    p.add_argument("--refs", type=int, default=3, help="reference images (default 3)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="> 1: cond + uncond rows per call (default 5)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="denoiser config override (e.g. ref_attention=isolated), repeatable")
    p.add_argument("--no-reference-cache", dest="reference_cache", action="store_false",
                   help="recompute the reference stream at every step")
    add_memory_arguments(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--warmup", type=int, default=1, help="generations before timing (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations (default 3)")
    p.add_argument("--out", type=Path, default=Path("out/benchmarks"), help=f"directory for {RESULTS}.json/.md")


COLUMNS = [("config", "config"), ("frames", "frames"), ("size", "size"), ("refs", "refs"), ("steps", "steps"),
           ("text_s", "text encode (s)"), ("image_s", "CLIP (s)"), ("vae_encode_s", "VAE encode (s)"),
           ("encode_s", "encode (s)"), ("denoise_s", "denoise, all calls (s)"), ("step_s", "per call (s)"),
           ("loop_s", "denoising loop (s)"), ("decode_s", "decode (s)"), ("other_s", "other (s)"),
           ("total_s", "total (s)"), ("denoise_share", "denoise share"), ("dtype", "dtype"), ("offload", "offload"),
           ("vae_tiling", "VAE tiling"), ("peak_mib", "peak memory (MiB)"), ("peak_kind", "peak of")]


def run(args) -> int:
    from .common import write_results

    check(args)
    rows = [measure(config, args) for config in args.config]
    config = {"configs": {name: CONFIGS[name] for name in args.config}, "frames": args.frames, "height": args.size,
              "width": args.size, "steps": args.steps, "refs": args.refs, "guidance_scale": args.guidance_scale,
              "overrides": parse_overrides(args.overrides), "reference_cache": args.reference_cache,
              "dtype": args.dtype, "device": args.device, "warmup": args.warmup, "repeats": args.repeats,
              "statistic": "medians over the timed generations; stage calls synchronised with the device"}
    print(write_results(RESULTS, rows, COLUMNS, args.out, config))
    return 0


def main(argv=None) -> int:
    from .common import standalone_main

    return standalone_main(sys.modules[__name__], argv, cache_dir=True)


if __name__ == "__main__":
    sys.exit(main())
