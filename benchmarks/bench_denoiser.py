"""Per-step latency and peak memory of the engine's denoiser against diffusers' Wan on the same weights.

    mvgen bench denoiser [--config tiny cpu wan-1.3b wan-14b] [--tokens N ...] [--refs R ...] [--layers K]
                         [--backend auto reference sdpa triton] [--compile] [--repeats 10] [--warmup 3]
    python -m benchmarks.bench_denoiser [same options]

For each size (``benchmarks.configs``), video token count and reference count, every variant runs in a fresh
process (``benchmarks.denoiser_worker``, forked from a server that has only imported torch, diffusers and the
engine) on the same saved ``WanTransformer3DModel`` weights and the same seeded inputs (batch 2: the cond + uncond
rows of classifier-free guidance):

- ``diffusers``: ``WanTransformer3DModel`` eager, references appended as known frames (R > 0);
- ``engine``: ``engine.checkpoint.Denoiser`` (one ``DenoiseCall`` per step, as the pipeline and the served model
  call it) for each ``--backend``, configured as the frame-append model (``ref_rope=shared``,
  ``ref_timestep=shared``, ``ref_attention=full``; with no adapter its reference stream has the base weights),
  so its output must equal diffusers';
- R > 0: the reference K/V cache off and on (``ref_attention=isolated``, ``ref_timestep=zero``: a different model
  from frame append, so the cached row is checked against the uncached one);
- the engine's options in the state other than its default, where its ``MvgenConfig`` has them (context cache off,
  merged reference weights, step cache on, FP8 weights on each compute path: weight-only dequantisation and FP8
  GEMMs, ``engine.runtime.fp8``); a missing field skips its row with the reason printed; ``--features`` picks some;
- ``--compile``: ``torch.compile`` of diffusers and of the engine's model (checked against diffusers eager).

Each variant's first call is compared with its oracle (relative L2 error under the dtype's tolerance; an FP8 row is
compared with the engine in the run's dtype under ``FP8_TOLERANCE``: the FP8 rounding of its weights) before
anything is timed; a mismatch fails the variant, records the error and the command exits 1. Step times are the
median and p90 of ``--repeats`` calls after ``--warmup``, synchronised with the device. Peak memory: CUDA
``max_memory_allocated`` (weights included) or, on CPU, the peak resident set of the variant's fresh process.
``wan-*`` run ``--layers`` layers; their step time at full depth is extrapolated as ``t * depth / layers``, which
scales the once-per-step embeddings and output head with the layers too (an upper bound, labelled in the table).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UsageError

from .configs import CONFIGS, BenchConfig, latent_grid, pixel_size

NAME = "denoiser"
HELP = "per-step latency and peak memory of the engine's denoiser vs diffusers' Wan (same weights, parity checked)"
RESULTS = "bench_denoiser"

BATCH = 2  # classifier-free guidance: cond + uncond rows in one call, as the pipeline batches them
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}  # relative L2 error of a parity check
# the engine as diffusers' frame-append model: the references are further frames of the same model
FRAME_APPEND = {"ref_rope": "shared", "ref_timestep": "shared", "ref_attention": "full"}
# a reference stream independent of the video and of the step: its K/V can be kept for the request
CACHEABLE = {"ref_attention": "isolated", "ref_timestep": "zero"}
# an FP8 row against the engine in the run's dtype: e4m3's 3 mantissa bits round each weight by up to 1/16 of it
# (measured 1.4e-2 weight-only and 1.7e-2 to 1.8e-2 with FP8 GEMMs on the tiny and cpu sizes, float32 on the CPU)
FP8_TOLERANCE = 6e-2
REPORTED = ("attention_backend", "ref_mode", "ref_rope", "ref_attention", "ref_timestep", "context_cache",
            "ref_weights", "step_cache_threshold", "quantize")
MEMORY = {"cuda_max_allocated": "peak CUDA memory allocated, weights included (MiB)",
          "peak_rss": "peak RSS of the variant's fresh process (MiB)"}


@dataclass(frozen=True)
class Variant:
    """One row: diffusers or the engine (``backend``, config ``overrides``, per-call cache key mode, reference
    cache switch), eager or compiled, and the variant whose output its first call must equal (``oracle``)."""

    key: str
    label: str
    engine: bool
    backend: str | None = None
    overrides: dict = field(default_factory=dict)
    cache: str = "request"  # request | cycle (see denoiser_worker.engine_step)
    reference_cache: bool = True
    compiled: bool = False
    oracle: str | None = None
    stream: str = ""  # how the references enter (the table's "references" column)
    tolerance: float | None = None  # of its parity check (None: the dtype's)
    skipped: str | None = None
    note: str = ""
    approximate: bool = False  # its output after the first call differs from the oracle's by design


@dataclass(frozen=True)
class Feature:
    """An optional engine feature: the ``MvgenConfig`` field it needs and the row's overrides (the state that
    differs from the engine's default, so the plain ``engine`` row is the other state)."""

    field: str
    label: str
    overrides: dict
    cache: str = "request"
    note: str = ""
    approximate: bool = False
    name: str | None = None  # the row's key part (default: the field; two rows of one field need their own)
    tolerance: float | None = None  # compared with the plain engine under this tolerance (None: with diffusers)

    @property
    def key(self) -> str:
        return self.name or self.field


def features(args) -> list[Feature]:
    return [
        Feature("context_cache", "engine, context cache off", {"context_cache": False}),
        Feature("ref_weights", "engine, merged reference weights", {"ref_weights": "merged"}),
        Feature("deterministic", "engine, deterministic", {"deterministic": True},
                note="batch-invariant numerics (engine.runtime.batch_invariance): per-row linears on the CPU, the fixed-tile "
                     "Triton matmul and attention on CUDA"),
        Feature("step_cache_threshold", "engine, step cache", {"step_cache_threshold": args.step_cache_threshold},
                cache="cycle", approximate=True,
                note="first call checked; later steps approximate by design, and the skip rate on these fixed "
                     "synthetic inputs is not a real request's"),
        Feature("quantize", "engine, FP8 weight-only", {"quantize": "fp8_weight_only"}, name="fp8-weight-only",
                tolerance=FP8_TOLERANCE, note="block linears float8_e4m3fn, dequantised on the fly"),
        Feature("quantize", "engine, FP8 GEMM", {"quantize": "fp8_gemm"}, name="fp8-gemm", tolerance=FP8_TOLERANCE,
                note="torch._scaled_mm, per-token activation scales (FP8 tensor cores on sm_89+; on a CPU it runs, "
                     "slowly)"),
    ]


def selected_features(args) -> list[Feature]:
    """``features`` narrowed to ``--features`` (their keys; default all)."""
    chosen = getattr(args, "features", None)
    return [f for f in features(args) if chosen is None or f.key in chosen]


def engine_fields() -> set[str]:
    from engine.config import MvgenConfig

    return {f.name for f in dataclasses.fields(MvgenConfig)}


def plan(refs: int, args, fields: set[str]) -> list[Variant]:
    """The variants of one (size, tokens, references) case, each after the variant it is checked against."""
    base = {"max_references": max(refs, 3)}
    as_frames = "as frames (shared RoPE and t, full attention)" if refs else ""
    out = [Variant("diffusers", "diffusers", engine=False, stream="appended as frames" if refs else "")]
    for backend in args.backend:
        plain = {**base, **FRAME_APPEND, "attention_backend": backend}
        out.append(Variant(f"engine-{backend}", "engine", True, backend, plain, oracle="diffusers", stream=as_frames))
        if refs:
            cacheable = {**base, **CACHEABLE, "attention_backend": backend}
            isolated = "isolated, t = 0 (RD-RoPE)"
            out.append(Variant(f"engine-{backend}-refcache-off", "engine, reference cache off", True, backend,
                               cacheable, reference_cache=False, stream=isolated,
                               note="no diffusers equivalent: the cached row is checked against this one"))
            out.append(Variant(f"engine-{backend}-refcache-on", "engine, reference cache on", True, backend,
                               cacheable, oracle=f"engine-{backend}-refcache-off", stream=isolated))
        for feature in selected_features(args):
            skipped = None if feature.field in fields else (
                f"skipped: the engine's MvgenConfig has no field {feature.field!r} yet")
            oracle = "diffusers" if feature.tolerance is None else f"engine-{backend}"
            out.append(Variant(f"engine-{backend}-{feature.key}", feature.label, True, backend,
                               {**plain, **feature.overrides}, feature.cache, oracle=oracle, stream=as_frames,
                               skipped=skipped, note=feature.note, approximate=feature.approximate,
                               tolerance=feature.tolerance))
    if args.compile:
        out.append(Variant("diffusers-compiled", "diffusers", False, compiled=True, oracle="diffusers",
                           stream="appended as frames" if refs else ""))
        for backend in args.backend:
            plain = {**base, **FRAME_APPEND, "attention_backend": backend}
            out.append(Variant(f"engine-{backend}-compiled", "engine", True, backend, plain, compiled=True,
                               oracle="diffusers", stream=as_frames))
    return out


def worker_spec(variant: Variant, case: dict, args, work: Path, oracles: set[str]) -> dict:
    return {
        "model_dir": str(case["model_dir"]), "grid": case["grid"], "refs": case["refs"], "batch": args.batch,
        "seed": args.seed, "dtype": args.dtype, "device": args.device, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "engine": variant.engine, "overrides": variant.overrides, "cache": variant.cache,
        "reference_cache": variant.reference_cache, "threads": args.threads,
        "compiled": variant.compiled, "compile_mode": args.compile_mode, "report_fields": list(REPORTED),
        "oracle": str(work / f"{variant.oracle}.safetensors") if variant.oracle else None,
        "tolerance": variant.tolerance or TOLERANCE[args.dtype],
        "save_output": str(work / f"{variant.key}.safetensors") if variant.key in oracles else None,
        "result": str(work / f"{variant.key}.json"),
    }


def run_worker(spec: dict, work: Path, key: str) -> tuple[dict | None, str]:
    """Run one variant in a fresh process forked from a server that has only imported the libraries (so each
    variant's peak memory and caches are its own, without paying the imports per variant); (its result, why it
    failed)."""
    from . import denoiser_worker

    spec_path = work / f"{key}.spec.json"
    spec["log"] = str(work / f"{key}.log")
    spec_path.write_text(json.dumps(spec))
    process = _worker_context().Process(target=denoiser_worker.main, args=([str(spec_path)],))
    process.start()
    process.join()
    result = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).is_file() else None
    if result is None or "error" in result:
        lines = Path(spec["log"]).read_text().strip().splitlines() if Path(spec["log"]).is_file() else []
        reason = result["error"] if result else (lines[-1] if lines else f"exit code {process.exitcode}")
        return None, reason
    return result, ""


def _worker_context():
    import multiprocessing

    from . import denoiser_worker

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(denoiser_worker.PRELOAD))
    return context


def measure_case(case: dict, args, fields: set[str]) -> list[dict]:
    """Every variant of one case, as table rows (failed and skipped ones included, with the reason)."""
    import numpy as np

    variants = plan(case["refs"], args, fields)
    oracles = {v.oracle for v in variants if v.oracle}
    rows = []
    with tempfile.TemporaryDirectory(prefix="mvgen-bench-") as tmp:
        work = Path(tmp)
        for variant in variants:
            row = {**case["row"], "variant": variant.label, "key": variant.key, "backend": variant.backend or
                   "diffusers default", "stream": variant.stream, "compiled": "yes" if variant.compiled else "no",
                   "parity_oracle": variant.oracle, "parity_tolerance": (variant.tolerance or TOLERANCE[args.dtype])
                   if variant.oracle else None, "approximate": variant.approximate}
            rows.append(row)
            if variant.skipped:
                row["note"] = variant.skipped
                row["skipped"] = True
            elif variant.oracle and not (work / f"{variant.oracle}.safetensors").is_file():
                row["note"] = f"skipped: its oracle ({variant.oracle}) did not run"
            if "note" in row:
                _progress(row)
                continue
            result, error = run_worker(worker_spec(variant, case, args, work, oracles), work, variant.key)
            if result is None:
                row.update(failed=True, note=f"failed: {error}")
            else:
                row.update(result, **_feature_cells(result.get("resolved", {}), args.device))
                row["parity"] = f"{result['parity_rel_err']:.1e} vs {variant.oracle}" if variant.oracle else "none"
                if variant.note:
                    row["note"] = variant.note
                if not result.get("parity_ok", True):
                    row.update(failed=True, note=f"PARITY FAILED: rel. err {result['parity_rel_err']:.3g} > "
                                                 f"{row['parity_tolerance']:g} vs {variant.oracle}; not timed")
                else:
                    samples = np.asarray(result["samples_s"]) * 1e3
                    row.update(median_ms=float(np.median(samples)), p90_ms=float(np.percentile(samples, 90)),
                               mean_ms=float(samples.mean()))
            _progress(row)
    _ratios(rows, case)
    return rows


def _feature_cells(resolved: dict, device: str) -> dict:
    """The engine's per-request features as the table shows them (blank where the engine lacks the field); the
    weights' precision with the FP8 compute path that runs on ``device``."""
    on = lambda flag: "on" if flag else "off"  # noqa: E731
    cells = {"ref_cache": on(resolved["reference_cache"]) if resolved.get("reference_cacheable") else ""}
    if "context_cache" in resolved:
        cells["context_cache"] = on(resolved["context_cache"])
    if "ref_weights" in resolved:
        cells["ref_weights"] = resolved["ref_weights"]
    if "step_cache_threshold" in resolved:
        cells["step_cache"] = resolved["step_cache_threshold"] or "off"
    if "quantize" in resolved:
        from engine.runtime.fp8 import compute_path

        mode = resolved["quantize"]
        cells["weights"] = "16/32-bit" if mode == "none" else f"FP8, {compute_path(mode, device).replace('_', '-')}"
    return cells


def _progress(row: dict) -> None:
    what = f"{row['config']} {row['tokens']} tokens R={row['refs']} {row['key']}"
    if "median_ms" in row:
        print(f"  {what}: {row['median_ms']:.4g} ms ({row['parity']})", file=sys.stderr, flush=True)
    else:
        print(f"  {what}: {row.get('note')}", file=sys.stderr, flush=True)


def _ratios(rows: list[dict], case: dict) -> None:
    """engine / diffusers of the same compile setting, and the full-depth extrapolation of wan-* cuts."""
    diffusers = {row["compiled"]: row.get("median_ms") for row in rows if row["backend"] == "diffusers default"}
    layers, depth = case["row"]["layers"], case["depth"]
    for row in rows:
        if "median_ms" not in row:
            continue
        base = diffusers.get(row["compiled"])
        if row["backend"] != "diffusers default" and base:
            row["ratio"] = row["median_ms"] / base
        if depth:
            row["full_depth_ms"] = row["median_ms"] * depth / layers
            row["full_depth"] = (f"{row['full_depth_ms']:.4g} (extrapolated from {layers} "
                                 f"layer{'s' if layers > 1 else ''} to {depth})")


def notes(args, memory_kind: str) -> str:
    """What the table's figures are, under it."""
    threads = f"{args.threads} thread(s)" if args.threads else "torch's default threads"
    return (f"\nStep: median and p90 of {args.repeats} calls after {args.warmup} warm-up calls, each variant in its "
            f"own process ({threads}) after a first call checked against its oracle (relative L2 error under "
            f"{TOLERANCE[args.dtype]:g}, FP8 rows under {FP8_TOLERANCE:g} against the engine; first call = "
            f"compilation or cache builds included); batch {args.batch} "
            f"(cond + uncond), {args.dtype} on {args.device}, device-synchronised. Memory: {MEMORY[memory_kind]}. "
            f"Engine rows run the engine's per-request Denoiser; diffusers appends the references as known frames.\n")


def cases(args) -> list[dict]:
    """(size, tokens, references) cases with their transformer directories (built once)."""
    from .configs import transformer_dir

    out = []
    for name in args.config:
        config: BenchConfig = CONFIGS[name]
        model_dir = transformer_dir(config, args.layers, args.cache_dir)
        wan = json.loads((model_dir / "config.json").read_text())
        for tokens in args.tokens or config.tokens:
            grid = latent_grid(tokens)
            for refs in args.refs:
                ref_tokens = refs * grid[1] * grid[2] // 4
                row = {"config": name, "layers": wan["num_layers"], "depth": config.depth,
                       "heads": wan["num_attention_heads"], "head_dim": wan["attention_head_dim"],
                       "ffn_dim": wan["ffn_dim"], "video_tokens": tokens, "ref_tokens": ref_tokens, "refs": refs,
                       "tokens": f"{tokens + ref_tokens} ({tokens}+{ref_tokens})", "grid": "x".join(map(str, grid)),
                       "video": pixel_size(grid), "batch": args.batch, "dtype": args.dtype, "device": args.device}
                out.append({"model_dir": model_dir, "grid": list(grid), "refs": refs, "depth": config.depth,
                            "wan": wan, "row": row})
    return out


def resolve(args) -> None:
    """Fill the machine-dependent defaults (device, dtype) and refuse what cannot run, naming the flag."""
    from .common import bench_device

    args.device = bench_device(args.device)
    on_gpu = args.device.startswith("cuda")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if on_gpu else "float32"
    gpu_configs = [name for name in args.config if CONFIGS[name].gpu]
    if gpu_configs and not on_gpu:
        raise UsageError(f"--config {' '.join(gpu_configs)}: GPU sizes (the Wan widths); on CPU use tiny or cpu")
    if "triton" in args.backend and not on_gpu:
        raise UsageError("--backend triton needs a CUDA device; on CPU the attention backends are auto (= "
                         "reference), reference and sdpa")
    check(args)


def check(args) -> None:
    for flag, value, least in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                               ("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--threads", args.threads, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    bad = [r for r in args.refs if r < 0]
    if bad:
        raise UsageError(f"--refs takes reference counts >= 0, got {bad}")
    for tokens in args.tokens or ():
        if tokens < 1 or latent_grid(tokens) is None:
            raise UsageError(f"--tokens {tokens}: no latent grid F x H x W (1x2x2 patches, F in 21, 13, 5, 3, 2, 1, "
                             f"width/height 1 to 2) has that many tokens; e.g. 320 (17 frames of 128x128)")
    if args.layers is not None:
        if args.layers < 1:
            raise UsageError(f"--layers must be >= 1, got {args.layers}")
        fixed = [name for name in args.config if CONFIGS[name].transformer is None]
        if fixed:
            raise UsageError(f"--layers does not apply to {', '.join(fixed)} (the embedded checkpoint's own depth)")
    if not args.step_cache_threshold > 0:
        raise UsageError(f"--step-cache-threshold must be > 0, got {args.step_cache_threshold}")


def _default_args():
    """The argument values ``features`` reads, at their defaults (to list the feature keys in ``--help``)."""
    from argparse import Namespace

    return Namespace(step_cache_threshold=0.1)


def add_arguments(p) -> None:
    from kernels import ATTENTION_BACKENDS

    p.add_argument("--config", nargs="+", choices=tuple(CONFIGS), default=["tiny"],
                   help="; ".join(f"{c.name}: {c.description}" for c in CONFIGS.values()) + " (default tiny)")
    p.add_argument("--tokens", type=int, nargs="+", help="video token counts (default per config: " + "; ".join(
        f"{c.name} {' '.join(map(str, c.tokens))}" for c in CONFIGS.values()) + ")")
    p.add_argument("--refs", type=int, nargs="+", default=[0, 3], help="reference counts (default 0 3)")
    p.add_argument("--layers", type=int, help="layers of the cpu/wan-* transformer (default: cpu 4, wan-* 2)")
    p.add_argument("--backend", nargs="+", choices=ATTENTION_BACKENDS, default=["auto"],
                   help="the engine's attention backends (default auto; on CPU: auto, reference, sdpa)")
    p.add_argument("--compile", action="store_true", help="add torch.compile of diffusers and of the engine")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default 'default')")
    p.add_argument("--dtype", choices=("auto", *TOLERANCE), default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda when available)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"rows per call (default {BATCH}: cond + uncond)")
    p.add_argument("--warmup", type=int, default=3, help="calls after the first (parity) call before timing")
    p.add_argument("--repeats", type=int, default=10, help="timed calls (median and p90)")
    p.add_argument("--steps", type=int, default=10, help="timesteps of the schedule the calls walk (default 10)")
    p.add_argument("--features", nargs="+", choices=[f.key for f in features(_default_args())],
                   help="only these feature rows (default: all)")
    p.add_argument("--step-cache-threshold", type=float, default=0.1,
                   help="the step-cache row's step_cache_threshold (where the engine has the field)")
    p.add_argument("--threads", type=int, help="CPU threads of each variant's process (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/benchmarks"), help=f"directory for {RESULTS}.json/.md")


def columns(rows: list[dict], memory_kind: str) -> list[tuple[str, str]]:
    cols = [("config", "config"), ("layers", "layers"), ("tokens", "tokens (video+ref)"),
            ("video", "video (frames x H x W px)"), ("variant", "variant"), ("backend", "attention"),
            ("stream", "references"), ("ref_cache", "reference K/V cache"), ("context_cache", "context cache"),
            ("ref_weights", "reference weights"), ("step_cache", "step cache"), ("weights", "block weights"),
            ("compiled", "torch.compile"),
            ("median_ms", "step median (ms)"), ("p90_ms", "step p90 (ms)")]
    if any(row.get("full_depth") for row in rows):
        cols.append(("full_depth", "step at full depth (ms)"))
    return cols + [("ratio", "engine / diffusers"), ("first_call_s", "first call (s)"),
                   ("peak_mib", MEMORY[memory_kind]), ("weights_mib", "weights (MiB)"), ("parity", "parity (rel. err)"),
                   ("note", "note")]


def run(args) -> int:
    from .common import write_results

    resolve(args)
    fields = engine_fields()
    missing = sorted({f.field for f in selected_features(args) if f.field not in fields})
    for name in missing:
        print(f"mvgen bench denoiser: the engine's MvgenConfig has no field {name!r} yet: its rows are skipped",
              file=sys.stderr)
    planned, rows = cases(args), []
    for case in planned:
        rows.extend(measure_case(case, args, fields))
    memory_kind = "cuda_max_allocated" if args.device.startswith("cuda") else "peak_rss"
    config = {
        "configs": {c["row"]["config"]: c["wan"] for c in planned},
        "batch": args.batch, "dtype": args.dtype, "device": args.device, "backends": args.backend,
        "refs": args.refs, "warmup": args.warmup, "repeats": args.repeats, "steps": args.steps, "seed": args.seed,
        "compile": args.compile, "compile_mode": args.compile_mode, "parity_tolerance": TOLERANCE[args.dtype],
        "threads": args.threads,
        "memory": MEMORY[memory_kind], "engine_fields_missing": missing,
        "statistic": "median and p90 of the timed calls after warm-up, device-synchronised; first call separate",
        "frame_append_settings": FRAME_APPEND, "reference_cache_settings": CACHEABLE,
    }
    table = write_results(RESULTS, rows, columns(rows, memory_kind), args.out, config) + notes(args, memory_kind)
    (args.out / f"{RESULTS}.md").write_text(table)
    print(table)
    failed = [row for row in rows if row.get("failed")]
    for row in failed:
        print(f"mvgen bench denoiser: {row['config']} {row['tokens']} R={row['refs']} {row['key']}: {row['note']}",
              file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    from .common import standalone_main

    return standalone_main(sys.modules[__name__], argv, cache_dir=True)


if __name__ == "__main__":
    sys.exit(main())
