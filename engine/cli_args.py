"""What every subcommand module shares: the one-line error contract and the arguments several commands take.

The root command (``mvgen.cli``) dispatches to ``engine.cli``, ``export.cli`` and ``server.cli``; they
import these pieces from here, downwards, so ``export`` and ``server`` never import each other or the root.
Contract: a user's mistake raises one of the packages' user errors (``UsageError`` for the command line);
the root prints it as one line ``mvgen: error: ...`` and exits with ``EXIT_USAGE``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from .errors import UsageError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``mvgen: error: ...`` and exit 2, no usage dump."""

    def error(self, message: str):
        command = self.prog.split(" ", 1)[1] if " " in self.prog else None
        hint = f" (see: mvgen {command} --help)" if command else " (see: mvgen --help)"
        raise UsageError(f"{message}{hint}")


def add_model_arguments(p) -> None:
    """The checkpoint and its weight sources, shared by every subcommand that loads the model."""
    from .tiny import VARIANTS

    p.add_argument("--model", default="tiny",
                   help=f"an embedded model, built locally ({', '.join(VARIANTS)}: the README's family table says "
                        "which layout each has), or a diffusers Wan or HunyuanVideo directory")
    p.add_argument("--adapter", type=Path, help="reference-stream LoRA (.safetensors or PEFT dir; tiny: its own)")
    p.add_argument("--adapter-2", type=Path, help="Wan2.2: the low-noise expert's reference-stream adapter")
    p.add_argument("--transformer", dest="transformer_file", type=Path, metavar="FILE",
                   help="single-file transformer weights (original Wan / ComfyUI .safetensors); the config comes "
                        "from --model's transformer/config.json")
    p.add_argument("--transformer-2", dest="transformer_2_file", type=Path, metavar="FILE",
                   help="Wan2.2: the low-noise expert's single-file weights")
    p.add_argument("--lora", dest="loras", action="append", default=[], metavar="PATH[:SCALE]",
                   help="base-model LoRA merged into the video stream (diffusers/PEFT, kohya, original Wan, ComfyUI, "
                        "LightX2V spellings); repeatable, applied in order")
    p.add_argument("--lora-2", dest="loras_2", action="append", default=[], metavar="PATH[:SCALE]",
                   help="Wan2.2: a base-model LoRA of the low-noise expert (repeatable)")
    p.add_argument("--lora-reference", action="store_true",
                   help="merge the base-model LoRAs into the reference stream too (MVI2V's reference stream is a "
                        "copy of the base)")


def checkpoint_sources(args) -> dict:
    """``Checkpoint.load``'s keyword arguments for the weight sources given on the command line (others left out)."""
    names = ("adapter_2", "transformer_file", "transformer_2_file", "loras", "loras_2", "lora_reference")
    return {name: getattr(args, name) for name in names if getattr(args, name) not in (None, [], False)}


def add_request_arguments(p) -> None:
    """A generation request's options, one per field of ``engine.request.FIELDS`` (``dest`` is the field's name);
    shared by ``mvgen generate`` and ``mvgen client generate``. Unset options stay None: the model fills them."""
    from . import request

    for field in request.FIELDS:
        options = dict(_KIND_OPTIONS[field.kind])
        suffix = "; repeatable" if options.get("action") == "append" else ""
        p.add_argument(field.flag, dest=field.name, required=field.required, help=field.describe() + suffix, **options)


def request_values(args) -> dict:
    """The request fields given on the command line, by field name (unset ones left out)."""
    from . import request

    return {f.name: getattr(args, f.name) for f in request.FIELDS if getattr(args, f.name) not in (None, [])}


def map_images(values: dict, read) -> dict:
    """``values`` (from ``request_values``) with each image path replaced by ``read(path, flag)``; a ``frames``
    field's video or directory is expanded into its frames first (decoded video frames pass through)."""
    from . import request
    from .media import frame_sources

    out = dict(values)
    for field in request.FIELDS:
        if field.name not in values:
            continue
        if field.kind == "image":
            out[field.name] = read(values[field.name], field.flag)
        elif field.kind == "images":
            out[field.name] = [read(path, field.flag) for path in values[field.name]]
        elif field.kind == "frames":
            out[field.name] = [read(item, field.flag) if isinstance(item, Path) else item
                               for item in frame_sources(values[field.name], field.flag)]
    return out


def parse_size(text: str) -> tuple[int, int]:
    """``HEIGHTxWIDTH`` (e.g. ``720x720``) -> (height, width); the values are checked with the request."""
    height, _, width = text.lower().partition("x")
    try:
        return int(height), int(width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH (e.g. 720x720), got {text!r}") from None


# argparse options of each kind of request field (engine.request.KINDS)
_KIND_OPTIONS = {
    "text": dict(type=str, metavar="TEXT"),
    "integer": dict(type=int, metavar="N"),
    "number": dict(type=float, metavar="X"),
    "numbers": dict(type=float, action="append", metavar="X"),
    "size": dict(type=parse_size, metavar="HxW"),
    "image": dict(type=Path, metavar="IMAGE"),
    "images": dict(type=Path, action="append", metavar="IMAGE"),
    "frames": dict(type=Path, metavar="VIDEO|DIR"),
}


def parse_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items -> ``{key: value}``; VALUE is JSON where it parses, else text."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def add_reference_cache_argument(p) -> None:
    """``--no-reference-cache``, shared by ``mvgen generate`` and ``mvgen serve``."""
    p.add_argument("--no-reference-cache", dest="reference_cache", action="store_false",
                   help="recompute the reference stream at every step even where its K/V could be kept "
                        "(ref_attention=isolated with ref_timestep=zero); same video within float rounding")


STEP_CACHE_DEFAULT = 0.1  # the threshold `--step-cache` alone sets: ~2x end to end, ~0.4% latent error (README)


def add_step_cache_argument(p) -> None:
    """``--step-cache [THRESHOLD]``, shared by ``mvgen generate`` and ``mvgen serve``: sets the config's
    ``step_cache_threshold`` (``engine.runtime.step_cache``); an explicit ``--set step_cache_threshold=...`` wins."""
    p.add_argument("--step-cache", nargs="?", type=float, const=STEP_CACHE_DEFAULT, default=None, metavar="THRESHOLD",
                   help="skip the block stack on steps where it would barely change (TeaCache's rule), while the "
                        "accumulated relative change of the first block's modulated input stays under THRESHOLD "
                        f"(alone: {STEP_CACHE_DEFAULT}); faster, not bit-identical (off by default)")


def step_cache_overrides(args, overrides: dict) -> dict:
    """``overrides`` with ``--step-cache``'s threshold, unless ``--set`` gave one; refused when not positive."""
    if args.step_cache is None or "step_cache_threshold" in overrides:
        return overrides
    if not args.step_cache > 0:
        raise UsageError(f"--step-cache THRESHOLD must be > 0 (leave the flag out for no step caching), "
                         f"got {args.step_cache}")
    return {**overrides, "step_cache_threshold": args.step_cache}


def add_deterministic_argument(p) -> None:
    """``--deterministic``, shared by ``mvgen generate``, ``mvgen serve`` and the benchmarks: sets the config's
    ``deterministic`` (``engine.runtime.batch_invariance``); an explicit ``--set deterministic=...`` wins."""
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant numerics: a request's video is bit-identical alone or batched with any "
                        "other requests (per-row linears and convolutions on the CPU; fixed-tile Triton matmul and "
                        "attention on CUDA)")


def config_flag_overrides(args, overrides: dict) -> dict:
    """``overrides`` with what the config flags of the command line set (``--step-cache``, ``--deterministic``,
    ``--quantize``), unless ``--set`` gave those keys."""
    overrides = step_cache_overrides(args, overrides)
    if getattr(args, "deterministic", False) and "deterministic" not in overrides:
        overrides = {**overrides, "deterministic": True}
    if getattr(args, "quantize", "none") != "none" and "quantize" not in overrides:
        overrides = {**overrides, "quantize": args.quantize}
    if getattr(args, "attention_precision", None) is not None and "attention_precision" not in overrides:
        overrides = {**overrides, "attention_precision": args.attention_precision}
    return overrides


def add_memory_arguments(p) -> None:
    """``--dtype``, ``--quantize``, ``--offload`` and ``--vae-tiling``, shared by ``mvgen generate`` and
    ``mvgen serve`` (``--quantize`` reaches the config through ``config_flag_overrides``)."""
    from kernels import ATTENTION_PRECISIONS

    from .config import QUANTIZE_MODES
    from .devices import NATIVE_BF16_FLAGS
    from .devices import DTYPES
    from .runtime.offload import OFFLOAD_MODES

    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="the denoiser's and text encoder's weights and activations (norms and modulation tables stay "
                        "float32; the VAE and CLIP always float32). auto: bfloat16 on CUDA; on a CPU float32 unless "
                        f"it multiplies bf16 natively ({'/'.join(NATIVE_BF16_FLAGS)}): without that, bf16 runs ~9x "
                        "slower than float32")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                   help="the denoiser's block linears held as float8_e4m3fn with per-output-channel scales (half the "
                        "bf16 weight bytes); fp8: FP8 GEMMs where the GPU has FP8 tensor cores (sm_89+), weight-only "
                        "dequantisation elsewhere; fp8_gemm / fp8_weight_only force one path (the log says which runs)")
    p.add_argument("--attention-precision", choices=ATTENTION_PRECISIONS, default=None,
                   help="the joint attention's arithmetic: bf16 (16-bit operands in the model's dtype, the default) "
                        "or int8 (INT8 QK^T with K smoothing and FP8 P.V, SageAttention's recipe; its measured error "
                        "is in the README); reaches the config through config_flag_overrides")
    p.add_argument("--offload", choices=OFFLOAD_MODES, default="none",
                   help="keep the denoiser in host memory between uses: 'model' moves it whole to the device for each "
                        "call and back after; 'block' moves one transformer layer at a time (least device memory, "
                        "slowest). Needs an accelerator: refused on the CPU")
    p.add_argument("--vae-tiling", action="store_true",
                   help="VAE encode/decode in overlapping 256-pixel tiles (diffusers' AutoencoderKLWan tiling): peak "
                        "memory follows the tile, not the frame; seams are blended")


def memory_options(args) -> dict:
    """``Checkpoint.load``'s keywords for the memory options on the command line (``add_memory_arguments``)."""
    return {"dtype": args.dtype, "offload": args.offload, "vae_tiling": args.vae_tiling}
