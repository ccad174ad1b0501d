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


def add_model_arguments(p) -> None:
    """``--model`` and ``--adapter``, shared by every subcommand that loads the model."""
    p.add_argument("--model", default="tiny", help="'tiny' (embedded, built locally) or a diffusers Wan2.1-I2V dir")
    p.add_argument("--adapter", type=Path, help="reference-stream LoRA (.safetensors or PEFT dir; tiny: its own)")


def model_paths(args) -> tuple[Path, Path | None]:
    """``--model``/``--adapter`` as directories: ``tiny`` is built under the root command's ``--cache-dir``.

    Resolving here, at the edge, is what lets nothing below the command line look at the environment."""
    from .tiny import resolve_checkpoint

    return resolve_checkpoint(args.model, args.adapter, args.cache_dir)


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
