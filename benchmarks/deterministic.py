"""What ``--deterministic`` costs per denoiser step, against the default, on the same weights and inputs.

    mvgen bench deterministic [--model cpu|tiny|DIR] [--requests 1 2] [--repeats 15] [--warmup 2]

Two ``Denoiser``s of one checkpoint, one with ``deterministic`` on, run the same later steps (each request's first
step, which builds its caches, is not timed: a served step reads the request's context K/V and kept inputs) of 1
or more concurrent requests with guidance (2 rows each, batched as the server batches equal shapes). Their calls
alternate, so a drift of the machine's speed falls on both alike; medians after warm-up. Every deterministic
output is checked equal, bit for bit, to the same request's step run alone.
"""
from __future__ import annotations

import sys
from pathlib import Path

NAME = "deterministic"
HELP = "per-step cost of --deterministic (batch-invariant numerics) against the default, same weights and inputs"
RESULTS = "deterministic"
LATENT = (5, 16, 16)  # 17 frames of 128x128: 320 video tokens
REFS = 2


def _inputs(config, generator, rows: int = 2) -> dict:
    import torch

    f, h, w = LATENT
    r = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    return dict(latents=r(rows, 16, f, h, w), condition=r(rows, config.condition_channels, f, h, w),
                timestep=torch.full((rows,), 500.0), text=r(rows, config.text_len, config.text_dim),
                image_context=r(rows, 257, config.image_dim) if config.image_dim else None,
                ref_latents=r(rows, REFS, 16, h, w))


def measure(model: str, requests: int, repeats: int, warmup: int, dtype: str) -> dict:
    import time

    import torch

    from engine.checkpoint import Checkpoint
    from engine.runtime.denoiser import DenoiseCall, Denoiser

    from .common import median

    denoisers = {mode: Denoiser(Checkpoint.load(model, dtype=dtype, device="cpu", deterministic=mode))
                 for mode in (False, True)}
    config = denoisers[False].model.config
    generator = torch.Generator().manual_seed(requests)
    firsts = [_inputs(config, generator) for _ in range(requests)]
    later = [DenoiseCall({"latents": torch.randn(x["latents"].shape, generator=generator),
                          "timestep": x["timestep"]}, f"r{i}") for i, x in enumerate(firsts)]
    for den in denoisers.values():
        den.run([DenoiseCall(x, f"r{i}") for i, x in enumerate(firsts)])
    alone = denoisers[True].run(later[:1])[0]
    samples = {False: [], True: []}
    for index in range(warmup + repeats):
        for mode, den in denoisers.items():
            start = time.perf_counter()
            out = den.run(later)
            seconds = time.perf_counter() - start
            if mode and not torch.equal(out[0], alone):
                raise AssertionError("a deterministic step changed bits in a batch")
            if index >= warmup:
                samples[mode].append(seconds)
    default, deterministic = median(samples[False]), median(samples[True])
    return {"requests": requests, "rows": 2 * requests, "default_ms": default * 1e3,
            "deterministic_ms": deterministic * 1e3, "cost": deterministic / default - 1,
            "samples_default_s": samples[False], "samples_deterministic_s": samples[True]}


def add_arguments(p) -> None:
    p.add_argument("--model", default="cpu", help="'cpu' (the CPU-sized checkpoint, built once), 'tiny' or a "
                                                 "diffusers Wan directory")
    p.add_argument("--requests", type=int, nargs="+", default=[1, 2], help="concurrent requests per step (1 2)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("out/benchmarks"))


def run(args) -> int:
    import torch

    from .common import write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model in ("cpu", "tiny"):
        from engine.tiny import ensure_tiny

        from .server_memory import build_cpu_sized

        tiny = ensure_tiny(args.cache_dir)
        model = str(tiny if model == "tiny" else build_cpu_sized(tiny, args.cache_dir / "cpu-sized"))
    rows = [measure(model, n, args.repeats, args.warmup, args.dtype) for n in args.requests]
    columns = [("requests", "requests (2 rows each)"), ("default_ms", "default step (ms)"),
               ("deterministic_ms", "--deterministic step (ms)"), ("cost", "cost")]
    config = {"model": args.model, "latent": LATENT, "refs": REFS, "dtype": args.dtype, "repeats": args.repeats,
              "warmup": args.warmup, "statistic": "median of alternating calls, later steps (caches built)"}
    print(write_results(RESULTS, rows, columns, args.out, config))
    return 0


def main(argv=None) -> int:
    from .common import standalone_main

    return standalone_main(sys.modules[__name__], argv, cache_dir=True)


if __name__ == "__main__":
    raise SystemExit(main())
