"""The ``mvgen`` command line.

Subcommands come from the modules in ``SUBCOMMAND_MODULES``: each has ``add_parser(subparsers)`` that adds
its subcommand(s) and sets ``func`` (``args -> exit code``) on them. A module must import its heavy or
optional dependencies inside its handlers, so ``mvgen --help`` works on a machine without them.
User mistakes (``UsageError``, ``RequestError``, checkpoint/adapter errors) end as one line
``mvgen: error: ...`` on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .errors import RequestError

# the lead extends this list with "server.cli" and "export.cli"
SUBCOMMAND_MODULES = ["engine.cli", "export.cli", "server.cli"]
DTYPES = ("float32", "bfloat16", "float16")
EXIT_USAGE = 2


class UsageError(ValueError):
    """A bad command line (the message is the whole story)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``mvgen: error: ...`` and exit 2, no usage dump."""

    def error(self, message: str):
        command = self.prog.split(" ", 1)[1] if " " in self.prog else None
        hint = f" (see: mvgen {command} --help)" if command else " (see: mvgen --help)"
        raise UsageError(f"{message}{hint}")


def _user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that are the user's mistake, not a bug (the loading errors are imported lazily)."""
    from .loading import CheckpointError
    from .lora import AdapterError

    return UsageError, RequestError, CheckpointError, AdapterError, FileNotFoundError


def build_parser() -> Parser:
    parser = Parser(prog="mvgen", description="Multi-view reference human video generation (Wan2.1-I2V + references).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except _user_errors() as error:
        message = str(error).strip().replace("\n", " ") or type(error).__name__
        print(f"mvgen: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mvgen: interrupted", file=sys.stderr)
        return 130


# ---- this module's subcommands ----------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    _add_generate(subparsers)
    tiny = subparsers.add_parser("tiny", help="build the embedded tiny checkpoint and print its directory")
    tiny.add_argument("--out", type=Path, help="directory to write it to (default: the cache, $MVGEN_CACHE)")
    tiny.set_defaults(func=run_tiny)
    demo = subparsers.add_parser("demo-inputs", help="write a synthetic first frame, mask and 3 reference views")
    demo.add_argument("--out", type=Path, required=True, help="directory for the PNGs")
    demo.set_defaults(func=run_demo_inputs)


def add_model_arguments(p) -> None:
    """``--model`` and ``--adapter``, shared by every subcommand that loads the model."""
    p.add_argument("--model", default="tiny", help="'tiny' (embedded, built locally) or a diffusers Wan2.1-I2V dir")
    p.add_argument("--adapter", type=Path, help="reference-stream LoRA (.safetensors or PEFT dir; tiny: its own)")


def add_request_arguments(p) -> None:
    """A generation request's arguments, shared by ``mvgen generate`` and ``mvgen client generate``."""
    p.add_argument("--first-frame", type=Path, required=True, help="first frame image")
    p.add_argument("--first-frame-mask", type=Path, help="mask image, white = person region to take from references")
    p.add_argument("--reference", type=Path, action="append", default=[], help="reference view image (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--frames", type=int, help="number of frames, 4k+1")
    p.add_argument("--height", type=int, help="multiple of 16")
    p.add_argument("--width", type=int, help="multiple of 16")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (<= 1 turns it off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, help="flow-matching sigma shift (default: the checkpoint's scheduler)")


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate a video from a first frame, reference views and a prompt",
        description="Generate a video; unset sizes/steps come from the model (tiny: 9 frames of 64x64, 4 steps).",
    )
    add_model_arguments(p)
    add_request_arguments(p)
    p.add_argument("--scheduler", choices=("unipc", "euler"), default="unipc")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="denoiser config override, e.g. ref_attention=isolated (repeatable; VALUE is JSON or text)")
    p.add_argument("--out", type=Path, required=True, help="output .mp4 (a .png contact sheet is written beside it)")
    p.set_defaults(func=run_generate)


def parse_overrides(items: list[str]) -> dict:
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


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_generate(args) -> int:
    import torch

    from .media import load_image, write_contact_sheet, write_mp4
    from .pipeline import MultiViewPipeline

    if args.out.suffix.lower() != ".mp4":
        raise UsageError(f"--out must name an .mp4 file, got {str(args.out)!r}")
    if args.out.parent.exists() and not args.out.parent.is_dir():
        raise UsageError(f"cannot write {args.out}: {args.out.parent} is not a directory")
    if args.fps <= 0:
        raise UsageError(f"--fps must be a positive integer, got {args.fps}")
    # read every input before the (possibly slow) model load, so a typo fails at once
    first_frame = load_image(args.first_frame, f"--first-frame {args.first_frame}")
    mask = load_image(args.first_frame_mask, f"--first-frame-mask {args.first_frame_mask}") \
        if args.first_frame_mask else None
    references = [load_image(path, f"--reference {path}") for path in args.reference]
    overrides = parse_overrides(args.overrides)
    try:
        pipe = MultiViewPipeline.from_pretrained(
            args.model, adapter=args.adapter, dtype=getattr(torch, args.dtype), device=_device(args.device),
            scheduler=args.scheduler, **overrides,
        )
    except ValueError as error:  # config values (overrides, mvgen_config.json) the model refuses
        if isinstance(error, _user_errors()):
            raise
        raise UsageError(f"cannot load model {args.model!r}: {error}") from None
    request = pipe.make_request(
        first_frame=first_frame, references=references, prompt=args.prompt, negative_prompt=args.negative_prompt,
        first_frame_mask=mask, num_frames=args.frames,
        height=args.height, width=args.width, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
        shift=args.shift,
    )
    frames = pipe.generate(request, progress=True)
    try:
        video = write_mp4(frames, args.out, fps=args.fps)
        sheet = write_contact_sheet(frames, args.out.with_suffix(".png"))
    except OSError as error:
        raise UsageError(f"cannot write {args.out}: {error}") from None
    print(video)
    print(sheet)
    return 0


def run_tiny(args) -> int:
    from .tiny import build_tiny, ensure_tiny

    print(build_tiny(args.out) if args.out else ensure_tiny())
    return 0


def run_demo_inputs(args) -> int:
    from .demo_inputs import write_demo_inputs

    for path in write_demo_inputs(args.out).values():
        print(path)
    return 0
