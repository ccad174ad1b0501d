"""Where a generation's time goes in the in-process pipeline: encode, denoise, decode.

    mvgen bench pipeline [--config tiny cpu] [--frames 17] [--size 128] [--steps 10] [--refs 3] [--repeats 3]
    python -m benchmarks.bench_pipeline [same options]

Runs ``engine.generation``'s loop (what ``MultiViewPipeline.generate`` runs) over the pipeline's own stages
wrapped in ``TimedStages``, which times every stage call, synchronised with the device: the once-per-request
encoders (umT5 text, CLIP image, VAE encode of the first-frame condition and of the references), each denoiser
call, and the VAE decode. ``loop`` is the whole denoising loop (denoiser calls plus guidance and scheduler
steps); ``other`` is what the stages do not account for (image fitting, noise, scheduler set-up, guidance,
scheduler steps). Medians over ``--repeats`` generations after ``--warmup``.

``--quantize fp8*`` runs the denoiser's block linears in 8 bits (``engine.runtime.fp8``; the row names the compute
path and the denoiser's weight bytes). ``--fp8-quality`` instead measures what FP8 costs in quality, memory and time
over whole generations (``fp8_quality``, written as ``bench_pipeline_fp8``).

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
                                             **overrides(args))


def overrides(args) -> dict:
    """``--set`` items, and ``--quantize`` unless ``--set`` gave it."""
    values = parse_overrides(args.overrides)
    if args.quantize != "none":
        values.setdefault("quantize", args.quantize)
    return values


def denoiser_weights(pipe) -> tuple[float, str]:
    """(MiB of the denoisers' weights, each storage once; how their block linears compute)."""
    from engine.runtime.fp8 import describe_path

    denoisers = pipe.stages.denoisers
    path = describe_path(denoisers[0].model, pipe.checkpoint.device)
    return sum(d.weight_bytes() for d in denoisers) / 2**20, "16/32-bit" if path == "none" else path


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
    row["weights_mib"], row["block_weights"] = denoiser_weights(pipe)
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
    if args.fp8_quality and (args.quantize != "none" or args.dtype != "auto"):
        raise UsageError("--fp8-quality runs its own variants (float32, bfloat16, FP8 weight-only, FP8 GEMMs): leave "
                         "--quantize and --dtype out")


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
    p.add_argument("--fp8-quality", action="store_true",
                   help="instead of timing one setting: FP8 against float32 and bfloat16 over whole generations on "
                        "trained-like weights (velocity error per step, final-latent error, weight bytes, peak "
                        f"memory, step time), written as {FP8_RESULTS}")
    p.add_argument("--out", type=Path, default=Path("out/benchmarks"), help=f"directory for {RESULTS}.json/.md")


COLUMNS = [("config", "config"), ("frames", "frames"), ("size", "size"), ("refs", "refs"), ("steps", "steps"),
           ("text_s", "text encode (s)"), ("image_s", "CLIP (s)"), ("vae_encode_s", "VAE encode (s)"),
           ("encode_s", "encode (s)"), ("denoise_s", "denoise, all calls (s)"), ("step_s", "per call (s)"),
           ("loop_s", "denoising loop (s)"), ("decode_s", "decode (s)"), ("other_s", "other (s)"),
           ("total_s", "total (s)"), ("denoise_share", "denoise share"), ("dtype", "dtype"), ("offload", "offload"),
           ("vae_tiling", "VAE tiling"), ("block_weights", "block weights"), ("weights_mib", "denoiser weights (MiB)"),
           ("peak_mib", "peak memory (MiB)"), ("peak_kind", "peak of")]


def run(args) -> int:
    from .common import write_results

    check(args)
    if args.fp8_quality:
        return fp8_quality(args)
    rows = [measure(config, args) for config in args.config]
    config = {"configs": {name: CONFIGS[name] for name in args.config}, "frames": args.frames, "height": args.size,
              "width": args.size, "steps": args.steps, "refs": args.refs, "guidance_scale": args.guidance_scale,
              "overrides": overrides(args), "reference_cache": args.reference_cache,
              "dtype": args.dtype, "device": args.device, "warmup": args.warmup, "repeats": args.repeats,
              "statistic": "medians over the timed generations; stage calls synchronised with the device"}
    print(write_results(RESULTS, rows, COLUMNS, args.out, config))
    return 0


# ---- FP8 quality over whole generations ------------------------------------------------------------------------------
FP8_RESULTS = "bench_pipeline_fp8"
# (label, dtype, quantize): the first is the reference every other is measured against
FP8_VARIANTS = (("float32", "float32", "none"), ("bfloat16", "bfloat16", "none"),
                ("FP8 weight-only, float32", "float32", "fp8_weight_only"),
                ("FP8 GEMM, float32", "float32", "fp8_gemm"),
                ("FP8 weight-only, bfloat16", "bfloat16", "fp8_weight_only"),
                ("FP8 GEMM, bfloat16", "bfloat16", "fp8_gemm"))
# the trained-like weights' distribution (``trained_like_weights``)
ROW_DECADES = 2.0  # per-output-channel scales log-uniform over this many orders of magnitude
OUTLIER_COLUMNS, OUTLIER_FACTOR = 3, 20.0  # input channels this much larger than the rest
STUDENT_T_DOF = 4  # heavy-tailed entries
WEIGHT_DISTRIBUTION = (f"block linears: Student-t ({STUDENT_T_DOF} dof) entries x per-output-channel scales "
                       f"log-uniform over {ROW_DECADES:g} decades x {OUTLIER_COLUMNS} outlier input channels "
                       f"{OUTLIER_FACTOR:g}x larger, rescaled to the initialised weight's RMS; the rest as initialised")


def trained_like_weights(weight, generator):
    """A weight [out, in] redrawn like a trained one (``WEIGHT_DISTRIBUTION``), at the given weight's RMS."""
    import torch

    rows, cols = weight.shape
    # Student-t: a normal over the root of a chi-square (a sum of STUDENT_T_DOF squared normals) per its dof
    chi2 = torch.randn(STUDENT_T_DOF, rows, cols, generator=generator, dtype=torch.float64).pow(2).sum(0)
    entries = torch.randn(rows, cols, generator=generator, dtype=torch.float64) / (chi2 / STUDENT_T_DOF).sqrt()
    row_scale = 10 ** ((torch.rand(rows, 1, generator=generator, dtype=torch.float64) - 0.5) * ROW_DECADES)
    w = entries * row_scale
    w[:, torch.randperm(cols, generator=generator)[:OUTLIER_COLUMNS]] *= OUTLIER_FACTOR
    rms = weight.double().pow(2).mean().sqrt()
    return (w * rms / w.pow(2).mean().sqrt()).to(weight.dtype)


def build_trained_like(source: Path, dest: Path, seed: int = 0) -> Path:
    """``dest``: the pipeline at ``source`` with its transformer's block linears redrawn by ``trained_like_weights``
    (seeded), the other components linked; built once."""
    import torch
    from diffusers import WanTransformer3DModel

    if (dest / "model_index.json").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    model = WanTransformer3DModel.from_pretrained(source / "transformer")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.startswith("blocks.") and param.ndim == 2 and "norm" not in name:
                param.copy_(trained_like_weights(param, generator))
    model.save_pretrained(dest / "transformer", safe_serialization=True)
    for item in source.iterdir():
        if item.name not in ("transformer", "model_index.json") and not (dest / item.name).exists():
            (dest / item.name).symlink_to(item.resolve())
    (dest / "model_index.json").write_text((source / "model_index.json").read_text())
    return dest


class RecordingStages(TimedStages):
    """``TimedStages`` that also keeps every denoiser call (its arguments and velocity), in order."""

    def __init__(self, stages, sync):
        super().__init__(stages, sync)
        self.calls: list[dict] = []

    def denoise(self, inputs, cache_key, expert, cache_references=True):
        out = self.__getattr__("denoise")(inputs, cache_key, expert, cache_references)
        self.calls.append({"inputs": dict(inputs), "cache_key": cache_key, "expert": expert,
                           "cache_references": cache_references, "velocity": out})
        return out


def _quality_variant(spec: dict) -> dict:
    """One FP8-quality variant in this (fresh) process: a whole generation from the seed (its final latents; the
    reference variant saves them and its denoiser calls to ``spec["record"]``), then the reference run's calls
    replayed on this variant's denoiser twice: the first pass gives its velocity at the reference's inputs, step by
    step, the second the step times (median)."""
    import numpy as np
    import torch

    from engine import generation
    from engine.pipeline import MultiViewPipeline

    from .common import peak_rss_bytes

    pipe = MultiViewPipeline.from_pretrained(spec["model"], spec["adapter"], dtype=spec["dtype"], device="cpu",
                                             cache_root=spec["cache_root"], quantize=spec["quantize"])
    stages = RecordingStages(pipe.stages, lambda: None)
    state = generation.prepare(pipe.checkpoint, pipe.make_request(**spec["request"]), stages)
    latents = generation.denoise(state, stages).float()
    if spec["reference"]:
        torch.save({"calls": stages.calls, "latents": latents}, spec["record"])
    record = torch.load(spec["record"], weights_only=True)
    out = dict(zip(("weights_mib", "block_weights"), denoiser_weights(pipe)))
    passes = [_replay(pipe, record["calls"]) for _ in range(2)]
    if not spec["reference"]:
        errors = [_rel(velocity, call["velocity"]) for velocity, call in zip(passes[0][0], record["calls"])]
        out.update(latent_rel_err=_rel(latents, record["latents"]), velocity_rel_err=errors,
                   velocity_rel_err_max=max(errors), velocity_rel_err_mean=float(np.mean(errors)))
    out.update(step_s=float(np.median(passes[1][1])), peak_mib=peak_rss_bytes() / 2**20)
    return out


def _replay(pipe, calls: list[dict]) -> tuple[list, list[float]]:
    """The recorded denoiser calls on ``pipe``'s denoiser, in order: (velocities, seconds per call)."""
    velocities, seconds = [], []
    for call in calls:
        start = time.perf_counter()
        velocities.append(pipe.stages.denoise(call["inputs"], call["cache_key"], call["expert"],
                                              call["cache_references"]).float())
        seconds.append(time.perf_counter() - start)
    pipe.stages.release(calls[0]["cache_key"])
    return velocities, seconds


def _rel(got, want) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def fp8_quality(args) -> int:
    """``--fp8-quality``: every ``FP8_VARIANTS`` entry in its own process on the trained-like checkpoint of each
    ``--config``; rows and a table in ``FP8_RESULTS``."""
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from engine.tiny import ensure_tiny

    from .common import write_results
    from .server_memory import build_cpu_sized

    if args.device != "cpu":
        raise UsageError("--fp8-quality runs on the CPU (its variants include float32 references)")
    tiny = ensure_tiny(args.cache_dir)
    context = multiprocessing.get_context("spawn")
    rows = []
    for config in args.config:
        source = tiny if config == "tiny" else build_cpu_sized(tiny, args.cache_dir / "cpu-sized")
        model = build_trained_like(source, args.cache_dir / f"fp8-quality-{config}")
        adapter = tiny / "adapter" if config == "tiny" else None
        request = dict(first_frame=_image(args, 0), references=[_image(args, 1 + i) for i in range(args.refs)],
                       prompt="a person turns around, showing the back of the jacket", num_frames=args.frames,
                       height=args.size, width=args.size, steps=args.steps, guidance_scale=args.guidance_scale,
                       seed=0)
        with tempfile.TemporaryDirectory(prefix="mvgen-fp8-") as tmp:
            for i, (label, dtype, quantize) in enumerate(FP8_VARIANTS):
                spec = dict(model=str(model), adapter=str(adapter) if adapter else None, dtype=dtype,
                            quantize=quantize, cache_root=str(args.cache_dir), request=request, reference=i == 0,
                            record=str(Path(tmp) / "reference.pt"))
                # a fresh process per variant; a worker that dies (killed for memory) raises BrokenProcessPool here
                # instead of leaving the call waiting, as multiprocessing.Pool would
                with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    result = pool.submit(_quality_variant, spec).result()
                row = {"config": config, "variant": label, "dtype": dtype, "quantize": quantize, **result}
                print(f"  fp8 quality {config} {label}: {row.get('latent_rel_err', 0):.3g} final latent, "
                      f"{row['step_s']:.3g} s/step", file=sys.stderr, flush=True)
                rows.append(row)
    _fp8_ratios(rows)
    config = {"configs": {name: CONFIGS[name] for name in args.config}, "frames": args.frames, "height": args.size,
              "width": args.size, "steps": args.steps, "refs": args.refs, "guidance_scale": args.guidance_scale,
              "weights": WEIGHT_DISTRIBUTION, "reference": FP8_VARIANTS[0][0], "device": "cpu",
              "statistic": "velocity: relative L2 error of each denoiser call at the reference run's inputs "
                           "(max and mean over the calls); final latent: relative L2 error of a whole generation "
                           "from the same seed; step: median time of the reference's calls replayed a second time "
                           "(the first replay is the warm-up); memory: peak RSS of the variant's process"}
    table = write_results(FP8_RESULTS, rows, FP8_COLUMNS, args.out, config)
    table += (f"\nWeights: {WEIGHT_DISTRIBUTION}. Errors against the float32 run of the same checkpoint; the "
              f"bfloat16 row is the yardstick (\"x bf16\": the row's error over bfloat16's).\n")
    (args.out / f"{FP8_RESULTS}.md").write_text(table)
    print(table)
    return 0


def _image(args, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)


def _fp8_ratios(rows: list[dict]) -> None:
    """Each row's errors over the bfloat16 row's of its config (the yardstick)."""
    yardstick = {row["config"]: row for row in rows if row["quantize"] == "none" and row["dtype"] == "bfloat16"}
    for row in rows:
        base = yardstick.get(row["config"])
        if base is not None and "latent_rel_err" in row:
            row["velocity_vs_bf16"] = row["velocity_rel_err_mean"] / base["velocity_rel_err_mean"]
            row["latent_vs_bf16"] = row["latent_rel_err"] / base["latent_rel_err"]


FP8_COLUMNS = [("config", "config"), ("variant", "variant"), ("block_weights", "block weights"),
               ("weights_mib", "denoiser weights (MiB)"), ("peak_mib", "peak RSS (MiB)"), ("step_s", "step (s)"),
               ("velocity_rel_err_mean", "velocity rel. err, mean"), ("velocity_rel_err_max", "velocity rel. err, max"),
               ("latent_rel_err", "final latent rel. err"), ("velocity_vs_bf16", "velocity x bf16"),
               ("latent_vs_bf16", "latent x bf16")]


def main(argv=None) -> int:
    from .common import standalone_main

    return standalone_main(sys.modules[__name__], argv, cache_dir=True)


if __name__ == "__main__":
    sys.exit(main())
