"""Step caching end to end: speed-up against the final latents' error, at several thresholds.

    mvgen bench steps [--config cpu] [--thresholds 0.05 0.1 0.2] [--steps 30] [--frames 17] [--size 128]

One in-process pipeline (``bench pipeline``'s ``tiny`` or ``cpu`` checkpoint) generates the same request with step
caching off and at each threshold (``MvgenConfig.step_cache_threshold``, switched on the loaded denoisers). Each
run is timed end to end (encoders, the denoising loop, VAE decode; median of ``--repeats`` after one warm-up) and
its final latents are compared with the uncached run's: relative L2 error ``||z - z_off|| / ||z_off||``. The
skipped steps are read from the denoiser's step cache before the request releases it. ``--quantize fp8*`` loads the
denoiser's block linears in 8 bits (``engine.runtime.fp8``); each row records the mode and how the linears computed.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from engine.cli_args import add_memory_arguments, parse_overrides
from engine.errors import UsageError

from .bench_pipeline import denoiser_weights, load_pipeline, request

NAME = "steps"
HELP = "step caching (TeaCache rule) end to end: speed-up vs the final latents' error at several thresholds"


class _CountingStages:
    """The pipeline's stages, reading each request's skipped/computed steps before its release drops them."""

    def __init__(self, stages):
        self._stages, self.counts = stages, []

    def __getattr__(self, name):
        return getattr(self._stages, name)

    def release(self, cache_key):
        states = [d.requests.get(cache_key) for d in self._stages.denoisers]
        self.counts.append(sum(s.step.skipped for s in states if s is not None and s.step is not None))
        return self._stages.release(cache_key)


def _generate(pipe, req, stages) -> tuple[float, object]:
    from engine import generation

    start = time.perf_counter()
    state = generation.prepare(pipe.checkpoint, req, stages)
    latents = generation.denoise(state, stages).clone()
    stages.decode(latents)
    return time.perf_counter() - start, latents


def measure(args) -> list[dict]:
    pipe = load_pipeline(args.config, args)
    req = request(pipe, args, seed=3)
    stages = _CountingStages(pipe.stages)
    base = [d.model.config for d in pipe.stages.denoisers]
    # --quantize reaches the loaded denoisers through the config (bench_pipeline.overrides); each row says what ran
    _, block_weights = denoiser_weights(pipe)
    rows, reference = [], None
    for threshold in [0.0, *args.thresholds]:
        for denoiser, cfg in zip(pipe.stages.denoisers, base):
            denoiser.model.config = cfg.replace(step_cache_threshold=threshold)
        _generate(pipe, req, stages)  # warm-up
        samples, latents = [], None
        for _ in range(args.repeats):
            seconds, latents = _generate(pipe, req, stages)
            samples.append(seconds)
        if reference is None:
            reference = latents
        error = ((latents.double() - reference.double()).norm() / reference.double().norm()).item()
        rows.append({"config": args.config, "quantize": base[0].quantize, "block_weights": block_weights,
                     "threshold": threshold, "steps": args.steps,
                     "skipped": stages.counts[-1], "median_s": statistics.median(samples), "samples_s": samples,
                     "latent_rel_err": error})
    for denoiser, cfg in zip(pipe.stages.denoisers, base):
        denoiser.model.config = cfg
    off = rows[0]["median_s"]
    for row in rows:
        row["speedup"] = off / row["median_s"]
    return rows


COLUMNS = [("config", "config"), ("quantize", "quantize"), ("block_weights", "block weights"),
           ("threshold", "threshold (0 = off)"), ("steps", "steps"),
           ("skipped", "steps skipped"), ("median_s", "end to end, median s"), ("speedup", "speed-up"),
           ("latent_rel_err", "final-latent rel. error vs off")]


def check(args) -> None:
    if any(not t > 0 for t in args.thresholds):
        raise UsageError(f"--thresholds must be positive (0 is the 'off' row, always measured), got {args.thresholds}")
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats), ("--size", args.size)):
        if value < 1:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    if args.size % 16:
        raise UsageError(f"--size must be a multiple of 16 pixels, got {args.size}")
    if args.frames < 1 or (args.frames - 1) % 4:
        raise UsageError(f"--frames must be 4k + 1, got {args.frames}")


def add_arguments(p) -> None:
    p.add_argument("--config", choices=("tiny", "cpu"), default="cpu",
                   help="tiny, or cpu: the tiny encoders/VAE around a 4-layer 768-wide denoiser (default)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128, help="video height = width in pixels")
    p.add_argument("--refs", type=int, default=2)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=2)
    add_memory_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("out/benchmarks"))
    p.set_defaults(reference_cache=True)


def run(args) -> int:
    from .common import write_results

    check(args)
    parse_overrides(args.overrides)
    rows = measure(args)
    config = {"config": args.config, "frames": args.frames, "size": args.size, "refs": args.refs,
              "guidance_scale": args.guidance_scale, "dtype": args.dtype, "quantize": rows[0]["quantize"],
              "repeats": args.repeats,
              "rule": "TeaCache: raw relative L1 of block 0's modulated input, accumulated; engine.runtime.step_cache"}
    print(write_results("step_cache", rows, COLUMNS, args.out, config))
    return 0


def main(argv=None) -> int:
    from .common import standalone_main

    return standalone_main(sys.modules[__name__], argv, cache_dir=True)


if __name__ == "__main__":
    sys.exit(main())
