"""Bytes the scheduler loop sends to the denoiser per step over BLS, before and after ``inputs_once``.

    mvgen bench bls [--model 14B] [--resolution 480p 720p] [--refs 3] [--dtype bf16] [--out DIR]

Counted from the denoiser's input declaration (``engine.denoiser_io.config_specs``, the names and shapes the
served ``mvgen_denoiser`` takes, every tensor at the model's dtype except the float32 ones), so it follows the
wire. Before (``--set inputs_once=false``): every step carries every input (the text states, the CLIP states,
the condition; the references at every step under ``full`` attention, at the first step only when their K/V is
cached). After (the default): the first step of a request (per expert) carries them, every later step the
latents and the timestep alone. The served counterpart is the loop's ``mvgen_denoiser_input_bytes_total`` /
``mvgen_denoiser_calls_total``, which ``mvgen bench server`` reports as ``input_bytes_per_call``.
"""
from __future__ import annotations

import sys

from engine.config import MvgenConfig
from engine.denoiser_io import STEP_INPUTS, config_specs

from .sp_comm import MODELS, PIXELS_PER_TOKEN, RESOLUTIONS, ROWS

NAME = "bls"
HELP = "bytes per denoiser step the loop sends over BLS, before and after inputs_once (computed from the I/O specs)"
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CLIP_TOKENS = 257
MIB = 1 << 20


def step_bytes(config: MvgenConfig, resolution: str, refs: int, dtype: str) -> dict[str, int]:
    """Bytes per input name of one step (cond + uncond rows) at ``resolution`` with ``refs`` square references."""
    height, width, frames, ref_side = RESOLUTIONS[resolution]
    scale = PIXELS_PER_TOKEN // 2  # the VAE's spatial factor (the patch takes the other 2)
    sizes = dict(batch=ROWS, frames=(frames - 1) // 4 + 1, height=height // scale, width=width // scale, refs=refs,
                 ref_height=ref_side // scale, ref_width=ref_side // scale, identity_len=CLIP_TOKENS)
    out = {}
    for spec in config_specs(config):
        count = 1
        for size in spec.shape(sizes):
            count *= size
        out[spec.name] = count * (4 if spec.dtype == "float32" else DTYPE_BYTES[dtype])
    return out


def rows(args) -> list[dict]:
    out = []
    for model in args.model:
        name, values = MODELS[model]
        for cached in (False, True):
            config = MvgenConfig(**values, **(dict(ref_attention="isolated", ref_timestep="zero") if cached else {}))
            for resolution in args.resolution:
                parts = step_bytes(config, resolution, args.refs, args.dtype)
                every = sum(parts.values())
                step = sum(parts[name] for name in STEP_INPUTS)
                before_later = every - (parts["ref_latents"] if cached else 0)
                out.append({
                    "model": name, "resolution": resolution, "refs": args.refs,
                    "references": "cached K/V (isolated, t = 0)" if cached else "full attention (every step)",
                    "first_step_mib": every / MIB, "before_later_mib": before_later / MIB,
                    "after_later_mib": step / MIB, "saved": 1 - step / before_later,
                    "parts_mib": {k: v / MIB for k, v in parts.items()},
                })
    return out


def columns() -> list[tuple[str, str]]:
    return [("model", "model"), ("resolution", "video"), ("references", "references"),
            ("first_step_mib", "first step (MiB)"), ("before_later_mib", "later step, before (MiB)"),
            ("after_later_mib", "later step, after (MiB)"), ("saved", "saved per later step")]


def add_arguments(p) -> None:
    from pathlib import Path

    p.add_argument("--model", nargs="+", choices=tuple(MODELS), default=["14B"])
    p.add_argument("--resolution", nargs="+", choices=tuple(RESOLUTIONS), default=["480p", "720p"])
    p.add_argument("--refs", type=int, default=3, help="references per request (default 3)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16")
    p.add_argument("--out", type=Path, default=Path("out/benchmarks"))


def run(args) -> int:
    from .common import write_results

    table = write_results("bls_bytes", rows(args), columns(), args.out,
                          {"dtype": args.dtype, "rows_per_step": ROWS, "refs": args.refs})
    print(table)
    return 0


def main(argv=None) -> int:
    from .common import standalone_main

    return standalone_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
