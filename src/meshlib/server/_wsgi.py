"""WSGI middleware: the mesh on the way in, for Flask and any WSGI app.

The same inbound pipeline as the ASGI middleware. WSGI has no lifespan, so the instance
starts (and registers, with Consul) on the first request, which tells it the port it is
served on, or when ``start()`` is called; it deregisters at process exit, or when
``meshlib serve`` drains it. Keys added to ``environ`` are namespaced: ``meshlib.deadline``.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from .._config import MeshConfig, load_config
from .._runtime import Mesh
from ..resilience._deadline import inbound_deadline
from ..routing._propagate import inbound_marks
from ..security import NoServiceIdentity, SpiffeId, TlsContexts
from ..telemetry import wsgi as telemetry_around
from ..telemetry._inbound import OnClose
from ._faults import FAULT_RESPONSE_HEADER
from ._inbound import RESERVED_PREFIX, Inbound, InboundRequest, LocalResponse, Stage

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["WSGIMiddleware"]


class WSGIMiddleware:
    """Join the mesh on the server side of a WSGI app.

    ``app.wsgi_app = meshlib.WSGIMiddleware(app.wsgi_app)`` for Flask. Serves
    ``/mesh/health``, ``/mesh/metrics`` and ``/mesh/status`` on the admin listener
    (``MESH_ADMIN_ADDR``; the app's port answers ``/mesh/...`` with 404), refuses requests
    whose caller's deadline has passed (504), caps the handler's outbound calls by the
    caller's deadline, applies the configured rate limits (429), concurrency limit (503) and
    fault injection (``MESH_RATE_LIMIT*``, ``MESH_MAX_CONCURRENT_REQUESTS``,
    ``MESH_FAULT_*``), and registers the instance in Consul (on the first request or
    ``start()``).

    Args:
        app: the application.
        config: configuration to use instead of reading the environment.
        stages: inbound stages to run before the application, in order.
        mesh: the mesh to join (default: the process's mesh for ``config``, shared with
            its clients and other middlewares; one made with ``meshlib.Mesh`` and closed
            by its maker keeps a test or an embedded server to itself).

    Raises:
        meshlib.ConfigError: the environment holds a bad ``MESH_*``/``CONSUL_*`` value, or
            the config file a bad ``faults`` entry.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        config: MeshConfig | None = None,
        stages: tuple[Stage, ...] = (),
        mesh: Mesh | None = None,
    ) -> None:
        self.app = app
        self.mesh = mesh or Mesh.for_config(load_config() if config is None else config)
        self.config = self.mesh.config
        self._tls = self.mesh.security.tls
        self.inbound = Inbound(self.mesh, stages)
        self.instance = self.inbound.instance
        #: the request path inside the SERVER span, server metrics and access log
        self._traced = telemetry_around(self._handle, self.config)

    def start(self, *, address: str | None = None, port: int | None = None) -> None:
        """Become ready (open the admin listener, register with Consul) now rather than on
        the first request."""
        self.inbound.open_admin()
        self.instance.start(address=address, port=port)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return self._traced(environ, start_response)

    def _handle(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        instance = self.instance
        if instance.state == "starting":
            port = environ.get("SERVER_PORT")
            self.start(
                address=environ.get("SERVER_NAME"),
                port=int(port) if port and str(port).isdigit() else None,
            )
        path: str = environ.get("PATH_INFO", "")
        method: str = environ.get("REQUEST_METHOD", "GET")
        if path.startswith(RESERVED_PREFIX):  # served on the admin listener only
            return _local(start_response, self.inbound.not_here(path))
        # The server already joined a repeated header (gunicorn: with ",", as Envoy does).
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):  # WSGI keeps these two unprefixed
            if environ.get(key):
                headers[key.replace("_", "-").lower()] = environ[key]
        inbound = self.inbound
        try:
            peer = _peer(environ, self._tls)
        except NoServiceIdentity as exc:  # ``meshlib serve`` refuses these at the handshake
            return _local(start_response, inbound.unproven(method, path, str(exc)))
        environ["meshlib.peer"] = peer
        verdict = inbound.admit(InboundRequest(method, path, headers, peer))
        if isinstance(verdict, LocalResponse):
            return _local(start_response, verdict)
        # admitted: it holds a concurrency slot until `finished` (on close of the body)
        environ["meshlib.deadline"] = verdict.deadline
        token = inbound_deadline.set(verdict.deadline)
        marks_token = inbound_marks.set(verdict.marks)
        try:
            fault = verdict.fault
            if fault is not None:
                if fault.delay:
                    time.sleep(fault.delay)  # this worker thread is the request's own
                instead = inbound.after_delay(verdict)
                if instead is not None:
                    return OnClose(_local(start_response, instead), inbound.finished)
                start_response = _marked(start_response, fault.marker)
            result = self.app(environ, start_response)
        except BaseException:
            inbound.finished()
            raise
        finally:
            inbound_deadline.reset(token)
            inbound_marks.reset(marks_token)
        return OnClose(result, inbound.finished)

    def __getattr__(self, name: str) -> Any:
        # Flask extensions sometimes reach through wsgi_app for the wrapped app's attributes.
        if name == "app":
            raise AttributeError(name)
        return getattr(self.app, name)


def _local(start_response: StartResponse, response: LocalResponse) -> list[bytes]:
    status = f"{response.status} {HTTPStatus(response.status).phrase}"
    start_response(status, list(response.headers))
    return [response.body]


def _peer(environ: WSGIEnvironment, tls: TlsContexts | None) -> SpiffeId | None:
    """The caller's identity from the TLS connection the server accepted (never a header).

    Raises:
        NoServiceIdentity: the caller's certificate proves no identity of this trust domain.
    """
    sock = environ.get("gunicorn.socket")
    if isinstance(sock, ssl.SSLSocket) and tls is not None:
        return tls.caller(sock.getpeercert())
    return None


def _marked(start_response: StartResponse, marker: str) -> StartResponse:
    """``start_response`` adding ``x-mesh-fault`` (an injected delay)."""

    def marked(status: str, headers: Any, exc_info: Any = None) -> Any:
        headers = [*headers, (FAULT_RESPONSE_HEADER, marker)]
        if exc_info is None:
            return start_response(status, headers)
        return start_response(status, headers, exc_info)

    return marked
