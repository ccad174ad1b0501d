"""``mvgen bench COMMAND`` (registered by ``mvgen.cli`` through ``add_parser``): one subcommand per benchmark.

A benchmark module in ``BENCHMARKS`` gives ``NAME`` (its subcommand), ``HELP``, ``add_arguments(parser)`` and
``run(args) -> exit code``, and also runs alone as ``python -m benchmarks.<module>``. It writes its results in
the one format of ``benchmarks.common`` (JSON + Markdown under ``--out``) and keeps heavy or optional
dependencies inside ``run``, so ``mvgen --help`` stays cheap.
"""
from __future__ import annotations

from engine.errors import UsageError

from . import (bench_denoiser, bench_mmdit, bench_pipeline, bench_plot, bench_server, bls_bytes, deterministic,
               fp8_load, sp_comm, stand_in, step_cache)

BENCHMARKS = (sp_comm, bls_bytes, deterministic, bench_denoiser, bench_mmdit, bench_pipeline, bench_server, step_cache,
              stand_in, fp8_load, bench_plot)


def user_errors() -> tuple[type[Exception], ...]:
    """Benchmarks refuse bad command lines with ``UsageError``."""
    return (UsageError,)


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks and cost models (results: JSON + Markdown under --out)")
    commands = bench.add_subparsers(dest="bench_command", metavar="COMMAND", parser_class=type(bench))
    commands.required = True
    for module in BENCHMARKS:
        p = commands.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
