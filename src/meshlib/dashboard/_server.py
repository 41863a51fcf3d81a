"""``meshlib dashboard``'s HTTP server: the page, its two assets and ``/api/mesh``.

A stdlib ``ThreadingHTTPServer`` on loopback by default (the JSON lists internal addresses,
as ``/mesh/status`` does), and a poller thread that refreshes the collector's view every
``interval`` seconds; a request never waits on the mesh, it gets the newest view. The page
and its script are hand-written files shipped in the wheel (``assets/``), read with
``importlib.resources``: no CDN, nothing fetched from elsewhere.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from ._collector import Collector

__all__ = ["DashboardServer"]

logger = logging.getLogger("meshlib.dashboard")

_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("assets", name).read_bytes()


class DashboardServer:
    """Serve ``collector``'s view on ``host:port`` (port 0: a free one), polling every
    ``interval`` seconds. ``start()``, then ``url``; ``close()`` stops both threads."""

    def __init__(
        self, collector: Collector, host: str = "127.0.0.1", port: int = 0, interval: float = 2.0
    ) -> None:
        self.collector = collector
        self.interval = interval
        handler = type("_BoundHandler", (_Handler,), {"dashboard": self})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.host = host
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self.server.serve_forever, name="meshlib-dashboard-http"),
            threading.Thread(target=self._poll, name="meshlib-dashboard-poll"),
        ]

    @property
    def url(self) -> str:
        """``http://host:port/``."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.server.server_address[1]}/"

    def start(self) -> DashboardServer:
        """Start serving and polling (the first poll runs at once)."""
        for thread in self._threads:
            thread.daemon = True
            thread.start()
        return self

    def close(self) -> None:
        """Stop polling and serving."""
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join(10)
        self.collector.close()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.collector.poll()
            except Exception:  # a poll that fails is shown as stale data, never fatal
                logger.exception("dashboard poll failed")
            self._stop.wait(self.interval)  # the page's refresh period


class _Handler(BaseHTTPRequestHandler):
    dashboard: DashboardServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/api/mesh":
            view: dict[str, Any] = {
                **self.dashboard.collector.snapshot(),
                "interval_s": self.dashboard.interval,
            }
            self._send(200, "application/json", json.dumps(view).encode())
        elif path in _ASSETS:
            name, kind = _ASSETS[path]
            self._send(200, kind, _asset(name))
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a poll every few seconds is not worth a log line
