"""One variant of ``mvgen bench denoiser`` in a fresh process: load, check parity, time, report peak memory.

    python -m benchmarks.denoiser_worker SPEC.json

``SPEC.json`` (written by ``benchmarks.bench_denoiser``) names the transformer directory, the inputs (latent
grid, references, batch, seed, dtype, device) and the variant: diffusers' ``WanTransformer3DModel`` (references
appended as known frames) or the engine's per-request ``Denoiser`` (config overrides, attention backend, which
cache key each call carries), eager or ``torch.compile``d. The first call's output is compared with the oracle's
(``oracle``: a safetensors file another variant saved) *before* anything is timed; a mismatch ends the worker
with the error recorded and no timing. Then ``warmup`` calls, then ``repeats`` timed calls, each synchronised
with the device; calls walk a fixed schedule of ``steps`` timesteps. A fresh process per variant is what makes
the peak memory the variant's own: CUDA ``max_memory_allocated`` since start-up (weights included), or on CPU the
process's peak resident set (``VmHWM``, which a process forked from ``bench_denoiser``'s forkserver starts at that
server's: the imported libraries, as in a fresh interpreter).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from .common import peak_rss_bytes, time_call

OUTPUT_KEY = "velocity"
# what a variant's process imports before it forks (benchmarks.bench_denoiser starts them from a forkserver)
PRELOAD = ("torch", "diffusers", "diffusers.models.transformers.transformer_wan", "engine.checkpoint",
           "engine.loading", "safetensors.torch")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def make_inputs(spec: dict, wan: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Seeded random inputs [B, ...] of the Wan I2V (or T2V) layout; text padded to 512 tokens, CLIP 257."""
    gen = torch.Generator().manual_seed(spec["seed"])
    b, (f, h, w), r = spec["batch"], spec["grid"], spec["refs"]
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    condition_channels = wan["in_channels"] - wan["out_channels"]
    return dict(
        latents=rand(b, 16, f, h, w),
        condition=rand(b, condition_channels, f, h, w) if condition_channels else None,
        text=rand(b, 512, wan["text_dim"]),
        image_context=rand(b, 257, wan["image_dim"]) if wan.get("image_dim") else None,
        ref_latents=rand(b, r, 16, h, w) if r else None,
    )


def timesteps(spec: dict, device: torch.device) -> list[torch.Tensor]:
    """The schedule the calls walk: ``steps`` timesteps from 999 down, one [B] tensor each."""
    values = torch.linspace(999.0, 999.0 / spec["steps"], spec["steps"])
    return [torch.full((spec["batch"],), float(t), device=device) for t in values]


def diffusers_step(spec: dict, wan: dict, device, dtype):
    """diffusers' Wan on the video, references appended as fully known frames (mask ones, their latents as the
    condition; T2V: further frames), as ``tests/engine/test_denoiser.py`` sets up the oracle."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(spec["model_dir"], torch_dtype=dtype).to(device).eval()
    if spec["compiled"]:
        model.compile(mode=spec["compile_mode"])
    x, ts = make_inputs(spec, wan, device, dtype), timesteps(spec, device)
    frames = x["latents"].shape[2]

    @torch.no_grad()
    def step(i: int) -> torch.Tensor:
        latents, condition = x["latents"], x["condition"]
        if x["ref_latents"] is not None:
            refs = x["ref_latents"].transpose(1, 2)  # [B, 16, R, H, W]
            latents = torch.cat([latents, refs], dim=2)
            if condition is not None:
                condition = torch.cat([condition, torch.cat([torch.ones_like(refs[:, :4]), refs], dim=1)], dim=2)
        hidden = latents if condition is None else torch.cat([latents, condition], dim=1)
        out = model(hidden, ts[i % len(ts)], x["text"], x["image_context"], return_dict=False)[0]
        return out[:, :, :frames]

    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return step, weights, {}


def engine_step(spec: dict, wan: dict, device, dtype):
    """The engine's per-request ``Denoiser`` (what the pipeline and the served model call), one ``DenoiseCall``
    per step under the variant's cache key: ``request`` (one request for the whole run: what it keeps persists
    across steps) or ``cycle`` (a new request at every pass over the schedule, the previous one released: what
    step caching needs); ``reference_cache`` False recomputes the reference stream at every step."""
    import dataclasses

    from engine.checkpoint import Checkpoint
    from engine.runtime.denoiser import DenoiseCall, Denoiser

    checkpoint = Checkpoint.load(spec["model_dir"], None, dtype=dtype, device=device, **spec["overrides"])
    denoiser = Denoiser(checkpoint)
    if spec["compiled"]:
        denoiser.model.compile(mode=spec["compile_mode"])
    x, ts = make_inputs(spec, wan, device, dtype), timesteps(spec, device)
    steps = len(ts)
    per_call = {}
    if not spec["reference_cache"]:  # an engine without the per-call switch: no key, so nothing is kept
        has_switch = "cache_references" in {f.name for f in dataclasses.fields(DenoiseCall)}
        per_call = {"cache_references": False} if has_switch else {}

    def key(i: int) -> str | None:
        if not spec["reference_cache"] and not per_call:
            return None
        if spec["cache"] == "cycle":
            if i % steps == 0 and i > 0:
                denoiser.release(f"bench-request-{i // steps - 1}")
            return f"bench-request-{i // steps}"
        return "bench-request"

    def step(i: int) -> torch.Tensor:
        result = denoiser.run([DenoiseCall({**x, "timestep": ts[i % steps]}, key(i), **per_call)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    config = denoiser.model.config
    resolved = {name: getattr(config, name) for name in spec["report_fields"] if hasattr(config, name)}
    resolved["reference_cacheable"] = config.caches_reference
    resolved["reference_cache"] = config.caches_reference and spec["reference_cache"] and key(0) is not None
    return step, denoiser.weight_bytes(), resolved


def run(spec: dict) -> dict:
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wan = json.loads((Path(spec["model_dir"]) / "config.json").read_text())
    build = engine_step if spec["engine"] else diffusers_step
    step, weights, resolved = build(spec, wan, device, dtype)
    result = {"weights_mib": weights / 2**20, "threads": torch.get_num_threads(), "resolved": resolved}

    start = time.perf_counter()
    out = step(0)  # the parity call: the first call of a request (compilation, cache builds)
    sync()
    result["first_call_s"] = time.perf_counter() - start
    if spec["oracle"]:
        from safetensors.torch import load_file

        want = load_file(spec["oracle"])[OUTPUT_KEY]
        err = rel_err(out.float().cpu(), want)
        result.update(parity_rel_err=err, parity_ok=err < spec["tolerance"])
        if not result["parity_ok"]:
            return result
    if spec["save_output"]:
        from safetensors.torch import save_file

        save_file({OUTPUT_KEY: out.float().cpu().contiguous()}, spec["save_output"])

    calls = iter(range(1, 1 << 30))
    result["samples_s"] = time_call(lambda: step(next(calls)), spec["repeats"], spec["warmup"], sync)
    if device.type == "cuda":
        result.update(peak_mib=torch.cuda.max_memory_allocated() / 2**20, memory_kind="cuda_max_allocated")
    else:
        result.update(peak_mib=peak_rss_bytes() / 2**20, memory_kind="peak_rss")
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the variant of ``argv[0]`` and write its result (or ``{"error": ...}``) to the spec's ``result``; its
    output goes to the spec's ``log`` when one is named."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("log"):
        log = open(spec["log"], "w")  # noqa: SIM115 -- stays open as this process's stdout/stderr
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
    try:
        result = run(spec)
    except Exception as error:  # the variant failed (a compile error, an engine refusal): say so, don't hang
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"}
    Path(spec["result"]).write_text(json.dumps(result))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
