"""The ``mvgen`` command line: the one place that knows every package.

Subcommands come from the modules in ``SUBCOMMAND_MODULES``: each has ``add_parser(subparsers)`` that adds
its subcommand(s) and sets ``func`` (``args -> exit code``) on them, and ``user_errors()`` naming the
exceptions that are the user's mistake. A module imports its heavy or optional dependencies inside its
handlers, so ``mvgen --help`` works on a machine without them. User mistakes end as one line
``mvgen: error: ...`` on stderr with exit code 2; anything else is a bug and keeps its traceback.
``benchmarks.cli`` adds ``mvgen bench`` (its subcommands: the benchmark modules listed there).

This is the process's entry point, so it is where the environment is read: ``$MVGEN_CACHE`` becomes the
default of ``--cache-dir`` (``args.cache_dir``), which the handlers pass down.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Mapping

from engine.cli_args import EXIT_USAGE, Parser
from engine.errors import UsageError
from engine.tiny import CACHE_ENV, default_cache_root

SUBCOMMAND_MODULES = ("engine.cli", "export.cli", "server.cli", "benchmarks.cli")


def _user_errors() -> tuple[type[Exception], ...]:
    """Every package's user-error types (collected when an error happens: they import heavy modules)."""
    errors = [UsageError]
    for name in SUBCOMMAND_MODULES:
        errors.extend(importlib.import_module(name).user_errors())
    return tuple(dict.fromkeys(errors))


def build_parser(environ: Mapping[str, str] | None = None) -> Parser:
    environ = os.environ if environ is None else environ
    parser = Parser(prog="mvgen", description="Multi-view reference human video generation (Wan2.1-I2V + references).")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_root(environ),
                        help=f"where the embedded 'tiny' model is built (default: ${CACHE_ENV}, else ~/.cache/mvgen)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser(os.environ).parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("mvgen: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        message = str(error).strip().replace("\n", " ") or type(error).__name__
        print(f"mvgen: error: {message}", file=sys.stderr)
        return EXIT_USAGE
