"""``mvgen api`` (OpenAI's video API in front of a running Triton server) and ``mvgen serve --api-port``.

The app runs on a uvicorn server in a thread (``ApiService``), so ``mvgen serve`` runs it beside tritonserver in
one process, and ``mvgen api`` waits for SIGINT/SIGTERM in the main thread, as ``mvgen serve`` does.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
import time
from pathlib import Path

from engine.errors import UsageError

DEFAULT_PORT = 8080
STARTUP_TIMEOUT_S = 30.0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "api", help="OpenAI's video API (/v1/videos) in front of a running mvgen server (HTTP)",
        description="Serve OpenAI's video API (POST/GET/DELETE /v1/videos, /v1/videos/{id}/content) over the "
                    "Triton server's mvgen_stream model (gRPC). Jobs are kept in --data-dir across restarts.")
    p.add_argument("--url", default="127.0.0.1:8001", help="the Triton server's gRPC HOST:PORT")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback only; any other needs --api-key or --api-key-file)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    add_api_arguments(p, prefix="")
    p.set_defaults(func=run_api)


def add_serve_arguments(p) -> None:
    """``mvgen serve``'s options for the API it starts beside tritonserver (``--api-port``), on serve's ``--host``."""
    p.add_argument("--api-port", type=int, metavar="P",
                   help="also serve OpenAI's video API (/v1/videos) on this port (see `mvgen api --help`)")
    add_api_arguments(p, prefix="api-")


def add_api_arguments(p, prefix: str) -> None:
    """The API's own options (``prefix``: ``api-`` on ``mvgen serve``, where they sit beside Triton's)."""
    p.add_argument("--api-key", dest="api_key", metavar="KEY",
                   help="clients must send 'Authorization: Bearer KEY' (required when listening beyond loopback); "
                        "prefer --api-key-file, which keeps the key out of the process list")
    p.add_argument("--api-key-file", dest="api_key_file", type=Path, metavar="FILE", help="read the API key from FILE")
    p.add_argument(f"--{prefix}data-dir", dest="data_dir", type=Path, metavar="DIR",
                   help="jobs database and videos (default: <--cache-dir>/api)")
    p.add_argument(f"--{prefix}retention", dest="retention", type=float, default=86_400.0, metavar="S",
                   help="a finished job and its video are deleted S seconds after it ended (expires_at; default 1 day)")
    p.add_argument(f"--{prefix}max-upload-mb", dest="max_upload_mb", type=float, default=64.0, metavar="MB",
                   help="largest request body (all uploads together), larger ones get 413 (default 64)")
    p.add_argument(f"--{prefix}max-queue", dest="max_queue", type=int, default=64, metavar="N",
                   help="jobs that may wait for a worker; a submission beyond gets 429 (default 64)")
    p.add_argument(f"--{prefix}concurrency", dest="concurrency", type=int, metavar="N",
                   help="jobs sent to the Triton server at once (default: the server's --max-concurrency)")
    p.add_argument(f"--{prefix}model-name", dest="model_name", metavar="NAME",
                   help="the model's name for clients (default: the served checkpoint's, e.g. 'tiny')")
    p.add_argument(f"--{prefix}fps", dest="fps", type=int, metavar="N",
                   help="frame rate of the MP4s and of seconds -> frames (default: the checkpoint's "
                        "mvgen_defaults.json 'fps', else 16)")
    p.add_argument(f"--{prefix}drain-timeout", dest="drain_timeout", type=float, default=30.0, metavar="S",
                   help="at shutdown, running jobs may finish for S seconds before they are cancelled (then failed, "
                        "'interrupted'); queued jobs wait for the next start (default 30)")


def run_api(args) -> int:
    service = build_service(args, args.url, args.host, args.port)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        service.start()
        print(f"mvgen api: listening on {service.base_url}/v1 (Triton {args.url}, jobs in {service.data_dir})",
              file=sys.stderr, flush=True)
        while not stop.wait(0.2) and service.alive():
            pass
        if not stop.is_set():
            raise UsageError("the API server stopped unexpectedly (see the messages above)")
        return 0
    finally:
        service.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def start_beside_serve(args) -> "ApiService":
    """``mvgen serve --api-port``: the API on serve's ``--host``, started before tritonserver (it answers 503 until
    Triton is ready); sends at most serve's ``--max-concurrency`` jobs at once unless ``--api-concurrency`` says."""
    taken = {args.grpc_port, args.http_port, args.metrics_port, getattr(args, "health_port", None)} - {None}
    if args.api_port in taken:
        raise UsageError(f"--api-port must differ from serve's other ports {sorted(taken)}, got {args.api_port}")
    if args.concurrency is None:
        args.concurrency = args.max_concurrency
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"[{host}]:{args.grpc_port}" if ":" in host else f"{host}:{args.grpc_port}"
    service = build_service(args, url, args.host, args.api_port).start()
    print(f"mvgen serve: OpenAI video API on {service.base_url}/v1 (jobs in {service.data_dir}; ready when Triton is)",
          file=sys.stderr, flush=True)
    return service


def build_service(args, url: str, host: str, port: int) -> "ApiService":
    """The app for ``args`` (``add_api_arguments``' options), checked, not started; ``UsageError`` on a bad option."""
    from ..launcher import LaunchError, check_port_free
    from .app import ApiSettings, create_app
    from .backend import TritonBackend
    from .metrics import ApiMetrics
    from .runner import JobRunner
    from .store import Store, StoreError

    if not 0 < port < 65536:
        raise UsageError(f"the API port must be in 1..65535, got {port}")
    key = api_key(args)
    if key is None and not is_loopback(host):
        raise UsageError(f"the API would listen on {host}, beyond loopback: give --api-key-file (or --api-key); "
                         f"clients then send 'Authorization: Bearer KEY'")
    for name, value in (("max-upload-mb", args.max_upload_mb), ("retention", args.retention)):
        if not value > 0:
            raise UsageError(f"--{name} must be > 0, got {value}")
    for name, value in (("max-queue", args.max_queue), ("concurrency", args.concurrency), ("fps", args.fps)):
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be a positive integer, got {value}")
    try:
        check_port_free(host, port, "API port")
    except LaunchError as error:
        raise UsageError(str(error)) from None
    data_dir = args.data_dir or Path(args.cache_dir) / "api"
    try:
        store = Store(data_dir, args.retention)
    except StoreError as error:
        raise UsageError(str(error)) from None
    # imageio-ffmpeg starts ffmpeg with preexec_fn (so a fork, not a vfork) unless this is set; forking while the jobs'
    # gRPC streams run trips gRPC's fork handlers (its poller then fails with EBADF, ffmpeg's pipe breaks)
    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
    backend = TritonBackend(url, args.model_name, args.fps)
    metrics = ApiMetrics()
    runner = JobRunner(store, backend, metrics, args.max_queue, args.concurrency)
    settings = ApiSettings(api_key=key, max_upload_bytes=int(args.max_upload_mb * 2**20),
                           drain_timeout_s=args.drain_timeout)
    return ApiService(create_app(settings, store, backend, runner, metrics), host, port, data_dir)


def api_key(args) -> str | None:
    if args.api_key and args.api_key_file:
        raise UsageError("give --api-key or --api-key-file, not both")
    if args.api_key_file is None:
        return args.api_key or None
    try:
        key = args.api_key_file.read_text().strip()
    except OSError as error:
        raise UsageError(f"--api-key-file: cannot read {args.api_key_file}: {error.strerror or error}") from None
    if not key or len(key.splitlines()) != 1:
        raise UsageError(f"--api-key-file: {args.api_key_file} must hold the key on one line")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class ApiService:
    """The app on a uvicorn server in a daemon thread (uvicorn installs no signal handlers off the main thread)."""

    def __init__(self, app, host: str, port: int, data_dir: Path):
        import uvicorn

        self.host, self.port, self.data_dir = host, port, data_dir
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="mvgen-api", daemon=True)

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> "ApiService":
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise UsageError(f"the API could not start on {self.host}:{self.port} (see the messages above)")
            self.thread.join(0.05)
        return self

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join()
