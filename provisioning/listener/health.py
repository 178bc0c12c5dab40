"""The listener's HTTP endpoints: ``/healthz`` (leader, subscribed, not stalled, can publish, and
in ``reason`` why not), ``/livez`` (the process runs) and ``/metrics`` (Prometheus).

A small stdlib server on its own thread: three read-only routes, no input to parse.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from provisioning.listener.service import Listener


def health_report(listener: Listener) -> dict[str, Any]:
    return {
        "ok": listener.healthy(),
        "leader": listener.is_leader,
        "transport": listener.source.transport,
        "subscribed": listener.source.connected,
        "stalled": listener.source.stalled,
        "can_publish": listener.publish_ok,
        "reason": listener.unhealthy_reason(),
    }


def serve_health(listener: Listener, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, ctype, code = generate_latest(listener.metrics.registry), CONTENT_TYPE_LATEST, 200
            elif self.path == "/healthz":
                report = health_report(listener)
                body, ctype = json.dumps(report).encode(), "application/json"
                code = 200 if report["ok"] else 503
            elif self.path == "/livez":
                body, ctype, code = b'{"ok": true}', "application/json", 200
            else:
                body, ctype, code = b"not found", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
