"""``mvgen generate``, ``mvgen tiny``, ``mvgen demo-inputs`` and ``mvgen convert`` (registered by ``mvgen.cli``
through ``add_parser``).

Heavy dependencies are imported inside the handlers, so ``mvgen --help`` works on a machine without them.
"""
from __future__ import annotations

from pathlib import Path

from .cli_args import (add_memory_arguments, add_model_arguments, add_request_arguments, checkpoint_sources, map_images,
                       memory_options, parse_overrides, request_values, add_reference_cache_argument,
                       add_step_cache_argument, config_flag_overrides, add_deterministic_argument)
from .errors import UsageError


def user_errors() -> tuple[type[Exception], ...]:
    """This package's exceptions that are the user's mistake, not a bug (imported lazily: they pull in torch)."""
    from .errors import RequestError
    from .errors import CheckpointError
    from .errors import AdapterError

    return UsageError, RequestError, CheckpointError, AdapterError, FileNotFoundError


def add_parser(subparsers) -> None:
    _add_generate(subparsers)
    tiny = subparsers.add_parser("tiny", help="build the embedded tiny checkpoint and print its directory")
    tiny.add_argument("--out", type=Path, help="directory to write it to (default: <--cache-dir>/tiny-v2)")
    tiny.set_defaults(func=run_tiny)
    demo = subparsers.add_parser("demo-inputs", help="write a synthetic first frame, mask and 3 reference views")
    demo.add_argument("--out", type=Path, required=True, help="directory for the PNGs")
    demo.set_defaults(func=run_demo_inputs)
    _add_convert(subparsers)


def _add_convert(subparsers) -> None:
    convert = subparsers.add_parser("convert", help="convert a released checkpoint into files mvgen loads")
    formats = convert.add_subparsers(dest="format", metavar="FORMAT", parser_class=type(convert))
    formats.required = True
    p = formats.add_parser(
        "stand-in", help="Stand-In's LoRA (the authors' .ckpt or kijai's .safetensors) -> an --adapter folder",
        description="Convert Stand-In's identity LoRA into an adapter folder with Stand-In's settings. The .ckpt is "
                    "read with torch.load(weights_only=True) and refused unless it holds exactly Stand-In's LoRA "
                    "tensors. Wan2.2-T2V-A14B: convert the high file for --adapter and the low one for --adapter-2.")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="Stand-In_*.ckpt or kijai's Stand-In .safetensors")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the adapter folder to write (new or empty)")
    p.add_argument("--rank", type=int, default=None, help="the LoRA rank every tensor must have (default: "
                   "Stand-In's 128)")
    p.set_defaults(func=run_convert_stand_in)
    p = formats.add_parser(
        "wan-pth", help="a Wan transformer saved with torch.save in the original names (Phantom-Wan-1.3B.pth) -> one "
                        ".safetensors for --transformer",
        description="Convert a pickled Wan2.1/2.2 T2V or I2V transformer in the original Wan key names (Phantom-Wan-"
                    "1.3B's .pth) into one .safetensors file, for --transformer. The file is read with torch.load("
                    "weights_only=True), memory-mapped, and refused unless it holds exactly a Wan transformer's "
                    "tensors (its computed RoPE buffer 'freqs' is left out).")
    p.add_argument("checkpoint", type=Path, metavar="PTH", help="the .pth / .pt / .ckpt file")
    p.add_argument("out", type=Path, metavar="OUT", help="the .safetensors file to write (must not exist)")
    p.set_defaults(func=run_convert_wan_pth)


def _add_generate(subparsers) -> None:
    from .checkpoint import SCHEDULERS

    p = subparsers.add_parser(
        "generate", help="generate a video from a prompt, reference views and (I2V models) a first frame",
        description="Generate a video; unset sizes/steps come from the model (tiny: 9 frames of 64x64, 4 steps). "
                    "I2V models need --first-frame; T2V models (tiny-t2v) take none: reference-to-video.",
    )
    add_model_arguments(p)
    add_request_arguments(p)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="unipc",
                   help="unipc: Wan's UniPC; euler: diffusers' flow-matching Euler; euler_linear: Euler over sigmas "
                        "spaced linearly from 1 to 1/steps before the shift (Stand-In's and DiffSynth's sampler)")
    add_memory_arguments(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="denoiser config override, e.g. ref_attention=isolated (repeatable; VALUE is JSON or text)")
    add_reference_cache_argument(p)
    add_step_cache_argument(p)
    add_deterministic_argument(p)
    p.add_argument("--out", type=Path, required=True, help="output .mp4 (a .png contact sheet is written beside it)")
    p.set_defaults(func=run_generate)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_generate(args) -> int:
    from .checkpoint import Checkpoint
    from .media import load_image, write_contact_sheet, write_mp4
    from .runtime.offload import check_offload
    from .pipeline import MultiViewPipeline
    from .request import make_request

    if args.out.suffix.lower() != ".mp4":
        raise UsageError(f"--out must name an .mp4 file, got {str(args.out)!r}")
    if args.out.parent.exists() and not args.out.parent.is_dir():
        raise UsageError(f"cannot write {args.out}: {args.out.parent} is not a directory")
    if args.fps <= 0:
        raise UsageError(f"--fps must be a positive integer, got {args.fps}")
    # every image is read before the (possibly slow) model load, so a typo fails at once
    values = map_images(request_values(args), lambda path, flag: load_image(path, flag))
    overrides = config_flag_overrides(args, parse_overrides(args.overrides))
    device = _device(args.device)
    try:
        check_offload(args.offload, device)
    except ValueError as error:  # the engine's words, without "cannot load model"
        raise UsageError(str(error)) from None
    try:
        checkpoint = Checkpoint.load(args.model, args.adapter, **checkpoint_sources(args), **memory_options(args),
                                     device=device, scheduler=args.scheduler, cache_root=args.cache_dir, **overrides)
    except ValueError as error:  # config values (overrides, mvgen_config.json) the model refuses
        if isinstance(error, user_errors()):
            raise
        raise UsageError(f"cannot load model {args.model!r}: {error}") from None
    # the request is checked against the weightless description, before any weight is read
    request = make_request(checkpoint.defaults, checkpoint.limits, **values)
    pipe = MultiViewPipeline.from_checkpoint(checkpoint, args.reference_cache)
    frames = pipe.generate(request, progress=True)
    try:
        video = write_mp4(frames, args.out, fps=args.fps)
        sheet = write_contact_sheet(frames, args.out.with_suffix(".png"))
    except OSError as error:
        raise UsageError(f"cannot write {args.out}: {error}") from None
    print(video)
    print(sheet)
    return 0


def run_convert_stand_in(args) -> int:
    from .adapters.stand_in import STAND_IN_RANK, convert_stand_in

    rank = STAND_IN_RANK if args.rank is None else args.rank
    if rank < 1:
        raise UsageError(f"--rank must be >= 1, got {rank}")
    print(convert_stand_in(args.checkpoint, args.out_dir, rank))
    return 0


def run_convert_wan_pth(args) -> int:
    from .backbones.wan.single_file import convert_pickled_transformer

    print(convert_pickled_transformer(args.checkpoint, args.out))
    return 0


def run_tiny(args) -> int:
    from .tiny import build_tiny, ensure_tiny

    print(build_tiny(args.out) if args.out else ensure_tiny(args.cache_dir))
    return 0


def run_demo_inputs(args) -> int:
    from .demo_inputs import write_demo_inputs

    for path in write_demo_inputs(args.out).values():
        print(path)
    return 0
