"""``mvgen serve --health-port P``: readiness and liveness that tell the truth, and the metrics page with ours.

Triton's own ``/v2/health/ready`` answers ready while the server drains after SIGTERM (and for the moment between a
stub's death and its model's unload), so the probes of ``deploy/`` read this endpoint instead:

    GET /health/ready   200 when tritonserver is ready, no served model is down or being restored, and the server
                        is not draining; else 503 with the reasons (JSON)
    GET /health/live    200 while tritonserver runs and answers its liveness, and no model has stayed down longer
                        than ``--restore-deadline``; else 503 (Kubernetes then restarts the pod)
    GET /metrics        Triton's metrics page followed by ``server.metrics.SupervisionMetrics``
"""
from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Check = Callable[[], list[str]]  # the reasons it fails; empty: it passes


class HealthEndpoint:
    def __init__(self, host: str, port: int, not_ready: Check, not_live: Check, metrics: Callable[[], str]):
        routes = {"/health/ready": not_ready, "/health/live": not_live}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/metrics":
                    return self._send(200, metrics(), "text/plain; version=0.0.4; charset=utf-8")
                if path not in routes:
                    return self._send(404, json.dumps({"error": f"no such path {path}; see {sorted(routes)}"}))
                reasons = routes[path]()
                self._send(503 if reasons else 200, json.dumps({"ok": not reasons, "reasons": reasons}))

            def _send(self, status: int, body: str, kind: str = "application/json") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # probes every few seconds: not worth a line each
                pass

        server_class = type("Server", (ThreadingHTTPServer,),
                            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self.httpd = server_class((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="mvgen-health")

    def start(self) -> "HealthEndpoint":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def fetch_text(url: str, timeout_s: float = 5.0) -> str:
    """The page at ``url``, or a Prometheus comment saying why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as error:
        return f"# tritonserver metrics unavailable: {error}\n"
