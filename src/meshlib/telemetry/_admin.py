"""The admin listener: the mesh's own routes on a port of their own, never the app's.

Envoy keeps its admin routes on an admin port, apart from the traffic it proxies; so does
meshlib. Health, metrics and status are answered by a small plaintext HTTP server thread on
``MESH_ADMIN_ADDR`` (loopback by default), one per process, for servers and pure clients
alike. The application's port answers ``/mesh/...`` with 404, so no caller of the app can
read who calls it, what it calls or which versions run, and Consul's health check, the
kubelet's probes and Prometheus's scrapes go to the admin port (plaintext, whatever
``MESH_TLS`` says, so they keep working under strict mTLS).

* ``/mesh/health``, ``/mesh/health/ready``, ``/mesh/health/live``, ``/mesh/metrics`` (and
  ``/metrics``): whoever can reach the listener, which is the operator's choice of address.
  Metrics are Prometheus text, or OpenMetrics with exemplars when the scraper prefers
  ``application/openmetrics-text`` in its ``Accept`` header (Prometheus does by default);
* ``/mesh/status`` lists internal addresses: loopback peers only, whatever the address.

Who is asking is the TCP peer's address, decided by ``ipaddress`` (never by a text prefix:
``::1:5ee:bad:c0de`` is not loopback); forwarded headers (``X-Forwarded-For``,
``Forwarded``) are never read. A server registers its routes (``set_routes``: readiness and
the inbound controls are the server's to answer); without one, the listener answers for a
pure client.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .._version import __version__
from ._metrics import OPENMETRICS_TYPE, REGISTRY

__all__ = [
    "AdminListener",
    "Routes",
    "admin_listener",
    "is_loopback",
    "serve_admin",
    "set_routes",
    "stop_admin",
    "wants_openmetrics",
]

logger = logging.getLogger("meshlib.telemetry")

#: A server's routes: (method, path, peer address) -> (status, headers, body).
Routes = Callable[[str, str, str | None], tuple[int, Sequence[tuple[str, str]], bytes]]

_METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a peer's IP address) is a loopback address, IPv4-mapped ones too."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def wants_openmetrics(accept: str | None) -> bool:
    """Whether an ``Accept`` header prefers OpenMetrics to the Prometheus text format.

    Prometheus sends ``application/openmetrics-text;version=1.0.0,...,text/plain;
    version=0.0.4;q=0.5,*/*;q=0.1``; a scraper that names only ``text/plain`` or ``*/*``
    (or nothing) keeps the classic text, unchanged.
    """
    if not accept or "openmetrics" not in accept:
        return False
    best = {"openmetrics": 0.0, "text": 0.0}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        kind = (
            "openmetrics"
            if media.lower() == "application/openmetrics-text"
            else "text"
            if media.lower() == "text/plain"
            else None
        )
        if kind is None:
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        best[kind] = max(best[kind], quality)
    return best["openmetrics"] > 0 and best["openmetrics"] >= best["text"]


class AdminListener(threading.Thread):
    """The admin routes on ``host:port`` (port 0: a free one; see ``port``)."""

    def __init__(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        super().__init__(name="meshlib-admin", daemon=True)
        server_class: type[_Server] = _ReusePortServer if reuse_port else _Server
        if ":" in host:
            server_class = _IPV6[server_class]
        self.server = server_class((host, port), _Handler)
        self.server.daemon_threads = True
        self.host = host

    @property
    def port(self) -> int:
        """The port listened on (useful with port 0)."""
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        """``http://host:port``."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"

    def run(self) -> None:
        self.server.serve_forever()

    def close(self) -> None:
        """Stop listening."""
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True


class _ReusePortServer(_Server):
    """Binds with ``SO_REUSEPORT``: the workers of ``meshlib serve`` share a reserved port."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _ReusePortServer6(_ReusePortServer):
    address_family = socket.AF_INET6


_IPV6: dict[type[_Server], type[_Server]] = {
    _Server: _Server6,
    _ReusePortServer: _ReusePortServer6,
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":  # what Prometheus asks by default
            path = "/mesh/metrics"
        peer = self.client_address[0] if self.client_address else None
        routes = _routes
        headers: Sequence[tuple[str, str]]
        if not path.startswith("/mesh/"):
            status, headers, body = _json(404, {"error": f"no admin route {path}"})
        elif path == "/mesh/metrics" and wants_openmetrics(self.headers.get("Accept")):
            body = REGISTRY.openmetrics_text().encode()
            status, headers = 200, [("content-type", OPENMETRICS_TYPE)]
        elif routes is not None:
            status, headers, body = routes("GET", path, peer)
        else:
            status, headers, body = client_routes(path, peer)
        self.send_response(status, HTTPStatus(status).phrase)
        for name, value in headers:
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes and scrapes are not worth a log line each


#: What ``/mesh/status`` answers: registered by the runtime as it loads (``_runtime``), so
#: telemetry imports nothing above it.
_STATUS: list[Callable[[], dict[str, Any]]] = []


def report_status(source: Callable[[], dict[str, Any]]) -> None:
    """Answer ``/mesh/status`` with ``source()`` (``_status.status_report`` of the meshes)."""
    _STATUS.append(source)


def client_routes(path: str, peer: str | None) -> tuple[int, list[tuple[str, str]], bytes]:
    """The admin routes of a process that serves no app."""
    if path == "/mesh/metrics":
        return 200, [("content-type", _METRICS_TYPE)], REGISTRY.prometheus_text().encode()
    if path == "/mesh/status":
        if not is_loopback(peer):
            return _json(403, {"error": "/mesh/status lists internal addresses: loopback only"})
        report = _STATUS[-1]() if _STATUS else {"meshlib": __version__, "services": {}}
        return _json(200, report)
    if path in ("/mesh/health", "/mesh/health/live", "/mesh/health/ready"):
        return _json(200, {"status": "alive", "meshlib": __version__})
    return _json(404, {"error": f"no mesh route {path}"})


def _json(status: int, payload: object) -> tuple[int, list[tuple[str, str]], bytes]:
    return status, [("content-type", "application/json")], json.dumps(payload).encode()


_lock = threading.Lock()
_listener: AdminListener | None = None
_routes: Routes | None = None


def serve_admin(host: str, port: int, *, reuse_port: bool = False) -> AdminListener:
    """Start this process's admin listener, once; later calls return the running one."""
    global _listener
    with _lock:
        if _listener is None:
            listener = AdminListener(host, port, reuse_port=reuse_port)
            listener.start()
            _listener = listener
            logger.info("admin routes (/mesh/health, /mesh/metrics) on %s", listener.url)
        return _listener


def _forget_in_child() -> None:
    """A forked child has the socket but not the thread: it opens its own if it needs one."""
    global _listener
    if _listener is not None:
        _listener.server.server_close()
    _listener = None


os.register_at_fork(after_in_child=_forget_in_child)


def admin_listener() -> AdminListener | None:
    """The running admin listener, if any."""
    return _listener


def set_routes(routes: Routes | None) -> None:
    """Answer the admin routes with a server's ``routes`` (None: as a pure client)."""
    global _routes
    _routes = routes


def stop_admin() -> None:
    """Stop the listener and forget the server's routes (for tests)."""
    global _listener, _routes
    with _lock:
        listener, _listener, _routes = _listener, None, None
    if listener is not None:
        listener.close()
