"""``mvgen serve``, ``mvgen repository`` and ``mvgen client generate`` (registered by ``mvgen.cli``)."""
from __future__ import annotations

import sys
from pathlib import Path

from engine.cli_args import (add_memory_arguments, add_model_arguments, add_request_arguments, checkpoint_sources,
                             map_images, memory_options, parse_overrides, request_values, add_reference_cache_argument,
                             add_step_cache_argument, config_flag_overrides, add_deterministic_argument)
from engine.checkpoint import SCHEDULERS
from engine.errors import UsageError
from engine.warmup import WARMUP_MODES

from .api import cli as api_cli


def user_errors() -> tuple[type[Exception], ...]:
    """The server's exceptions that are the user's mistake: a refused or unreachable request, a failed start."""
    from .client import ClientError
    from .launcher import LaunchError

    return ClientError, LaunchError


def add_parser(subparsers) -> None:
    _add_serve(subparsers)
    _add_repository(subparsers)
    api_cli.add_parser(subparsers)
    client = subparsers.add_parser("client", help="talk to a running mvgen server (gRPC)")
    commands = client.add_subparsers(dest="client_command", metavar="COMMAND", parser_class=type(client))
    commands.required = True
    _add_client_generate(commands)


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the model on Triton Inference Server (gRPC + HTTP + Prometheus metrics)",
        description="Build a Triton model repository for the model and run tritonserver until SIGINT/SIGTERM.",
    )
    add_model_arguments(p)
    p.add_argument("--repository", type=Path, help="write the model repository here (default: a temporary dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    add_memory_arguments(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=SCHEDULERS[0])
    p.add_argument("--max-tokens", type=int, default=131_072, help="reject requests longer than this (tokens)")
    p.add_argument("--max-concurrency", type=int, default=8, help="requests generated at once per mvgen model")
    p.add_argument("--pad-batch-to", type=int, default=0, metavar="ROWS",
                   help="pad every denoiser batch to ROWS rows (default 0: batches at their real size). A fallback "
                        "only: --deterministic makes a request's bits independent of its batch without the padding")
    p.add_argument("--denoiser-plan", type=Path, help="serve this TensorRT plan as mvgen_denoiser")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="denoiser config override, e.g. ref_attention=isolated (repeatable)")
    add_reference_cache_argument(p)
    add_step_cache_argument(p)
    add_deterministic_argument(p)
    p.add_argument("--reference-cache-mb", type=int, default=8192,
                   help="reference K/V the denoiser holds at once, over all requests (least recently used dropped)")
    p.add_argument("--sp", type=int, default=1, metavar="N",
                   help="sequence-parallel ranks per denoiser (Ulysses): the denoiser starts a worker per other rank, "
                        "one GPU each (gloo processes on CPU); the model's heads must be divisible by N")
    p.add_argument("--cfg-parallel", action="store_true",
                   help="run the cond and uncond halves of each step on two groups of --sp ranks (2 x N GPUs)")
    p.add_argument("--worker-timeout", type=float, default=120.0, metavar="S",
                   help="a denoiser worker silent this long fails the request; the server then reports not-ready "
                        "until it has restarted its workers (default 120)")
    p.add_argument("--warmup", choices=WARMUP_MODES, default="full",
                   help="before reporting ready, each model makes its weights resident and runs one call at the "
                        "model's default request (full), only reads its weights in (weights), or neither (none)")
    p.add_argument("--log-file", type=Path, help="tritonserver log (default: in the temporary work dir)")
    _add_supervision_arguments(p)
    api_cli.add_serve_arguments(p)
    p.set_defaults(func=run_serve)


def _add_supervision_arguments(p) -> None:
    """Health, supervision and shutdown (server.supervisor, server.health, server.call_bounds)."""
    from .launcher import SHUTDOWN_GRACE_S

    p.add_argument("--health-port", type=int, metavar="P",
                   help="serve readiness (/health/ready), liveness (/health/live) and the metrics page with mvgen "
                        "serve's own metrics (/metrics) on this port: the readiness that is false while a model is "
                        "restored or the server drains (deploy/'s probes read it; default: off)")
    p.add_argument("--shutdown-grace", type=float, default=SHUTDOWN_GRACE_S, metavar="S",
                   help="after SIGTERM/SIGINT new requests are refused and those in flight get S seconds to finish "
                        f"before tritonserver stops (default {SHUTDOWN_GRACE_S:.0f}); a second signal stops at once")
    p.add_argument("--restore-deadline", type=float, metavar="S",
                   help="liveness fails once a model has stayed down this long (its restoration keeps failing; "
                        "default: the time allowed to start, loading plus warm-up)")
    p.add_argument("--call-timeout", type=float, default=60.0, metavar="S",
                   help="the loop waits at most S seconds plus --call-timeout-per-ktoken per 1000 tokens of the "
                        "request for one call to a model before it takes the model for hung (default 60)")
    p.add_argument("--call-timeout-per-ktoken", type=float, default=1.0, metavar="S",
                   help="seconds per 1000 rows x tokens of the request, times the requests in flight (default 1)")
    p.add_argument("--test-hooks", action="store_true",
                   help="tests only: honour the mvgen_fault request parameter (an out-of-memory error or a hang in a "
                        "chosen model, server/fault_injection.py)")


def _add_repository(subparsers) -> None:
    p = subparsers.add_parser(
        "repository", help="write the Triton model repository serving a TensorRT plan (for tritonserver)",
        description="mvgen_denoiser becomes the plan (platform tensorrt_plan); the other models stay python.",
    )
    p.add_argument("--plan", type=Path, required=True, help="a plan built by `mvgen export tensorrt`")
    p.add_argument("--out", type=Path, required=True, help="repository directory")
    p.add_argument("--model", help="checkpoint of the python models (default: the plan's)")
    p.add_argument("--adapter", type=Path, help="adapter of the python models (default: the plan's)")
    p.set_defaults(func=run_repository)


def _add_client_generate(commands) -> None:
    p = commands.add_parser("generate", help="generate a video on a server, with a progress bar",
                            description="The arguments of `mvgen generate`; the model is the server's.")
    p.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC HOST:PORT")
    add_request_arguments(p)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--no-stream", action="store_true", help="use the unary model (no progress bar)")
    p.add_argument("--timeout", type=float, help="give up after this many seconds without a response")
    p.add_argument("--out", type=Path, required=True, help="output .mp4 (a .png contact sheet is written beside it)")
    p.set_defaults(func=run_client_generate)


def run_serve(args) -> int:
    from .launcher import LaunchError, ServeConfig, serve_forever
    from .repository import RepositoryOptions

    for flag in ("grpc_port", "http_port", "metrics_port"):
        port = getattr(args, flag)
        if not 0 < port < 65536:
            raise UsageError(f"--{flag.replace('_', '-')} must be a port in 1..65535, got {port}")
    if args.reference_cache_mb <= 0:
        raise UsageError(f"--reference-cache-mb must be a positive number of MiB, got {args.reference_cache_mb}")
    if args.sp < 1:
        raise UsageError(f"--sp must be a positive number of ranks, got {args.sp}")
    if not args.worker_timeout > 0:
        raise UsageError(f"--worker-timeout must be a positive number of seconds, got {args.worker_timeout}")
    if args.health_port is not None and not 0 < args.health_port < 65536:
        raise UsageError(f"--health-port must be a port in 1..65535, got {args.health_port}")
    for flag, value in (("--shutdown-grace", args.shutdown_grace), ("--restore-deadline", args.restore_deadline),
                        ("--call-timeout", args.call_timeout)):
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be a positive number of seconds, got {value}")
    if not args.call_timeout_per_ktoken >= 0:
        raise UsageError(f"--call-timeout-per-ktoken must be >= 0 seconds, got {args.call_timeout_per_ktoken}")
    if args.denoiser_plan is not None and not args.denoiser_plan.is_file():
        raise UsageError(f"--denoiser-plan: file not found: {args.denoiser_plan}")
    options = RepositoryOptions(
        model=str(args.model), adapter=str(args.adapter) if args.adapter else None,
        sources=checkpoint_sources(args), cache_root=str(args.cache_dir), **memory_options(args), device=args.device,
        scheduler=args.scheduler, max_tokens=args.max_tokens, overrides=config_flag_overrides(args, parse_overrides(args.overrides)),
        max_concurrency=args.max_concurrency, pad_batch_to=args.pad_batch_to,
        denoiser_plan=str(args.denoiser_plan) if args.denoiser_plan else None,
        reference_cache=args.reference_cache, reference_cache_mb=args.reference_cache_mb,
        sp=args.sp, cfg_parallel=args.cfg_parallel, worker_timeout_s=args.worker_timeout, warmup=args.warmup,
        call_timeout_s=args.call_timeout, call_timeout_per_ktoken_s=args.call_timeout_per_ktoken,
        test_hooks=args.test_hooks,
    )
    config = ServeConfig(host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                         metrics_port=args.metrics_port, repository=args.repository, log_file=args.log_file,
                         health_port=args.health_port, shutdown_grace_s=args.shutdown_grace,
                         restore_deadline_s=args.restore_deadline)
    api = api_cli.start_beside_serve(args) if args.api_port is not None else None
    try:
        return serve_forever(options, config, announce=lambda line: print(line, file=sys.stderr, flush=True))
    except LaunchError as error:
        raise UsageError(str(error)) from None
    finally:
        if api is not None:
            api.stop()


def run_repository(args) -> int:
    from .plan_repository import write_repository

    print(write_repository(args.plan, args.out, model=args.model, adapter=args.adapter, cache_root=args.cache_dir))
    return 0


def run_client_generate(args) -> int:
    from engine.media import write_contact_sheet, write_mp4

    from .client import ClientError, GenerationInputs, generate

    if args.out.suffix.lower() != ".mp4":
        raise UsageError(f"--out must name an .mp4 file, got {str(args.out)!r}")
    request = GenerationInputs(**map_images(request_values(args), _existing))
    try:
        frames = _generate_with_bar(args, request, generate)
    except ClientError as error:
        raise UsageError(str(error)) from None
    print(write_mp4(frames, args.out, fps=args.fps))
    print(write_contact_sheet(frames, args.out.with_suffix(".png")))
    return 0


def _existing(path: Path, flag: str) -> Path:
    """An image file the client will send encoded; a missing one is refused before connecting."""
    if not path.is_file():
        raise UsageError(f"{flag}: file not found: {path}")
    return path


def _generate_with_bar(args, request, generate):
    """Streamed progress as a tqdm bar, opened at the first step (so a refused request prints no bar)."""
    from tqdm import tqdm

    if args.no_stream:
        return generate(args.url, request, stream=False, timeout_s=args.timeout)
    bars = []

    def on_progress(step, total):
        if not bars:
            bars.append(tqdm(total=total, desc="denoising", unit="step", file=sys.stderr))
        bars[0].update(step - bars[0].n)

    try:
        return generate(args.url, request, on_progress, stream=True, timeout_s=args.timeout)
    finally:
        for bar in bars:
            bar.close()
