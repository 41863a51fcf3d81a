"""Telemetry of inbound requests: the SERVER span, the server metrics, the access log line.

The ASGI and WSGI middlewares hand their request handler to ``asgi()`` / ``wsgi()``, which
wrap it. Requests under ``/mesh/`` (health checks, scrapes) are not measured. Everything
else is, including requests the mesh answers itself (504 for a spent deadline, 403 or 429
from later stages): an operator wants to see those most.

The caller's trace context is extracted from ``traceparent``/``tracestate`` and made
current for the handler, so the handler's own meshlib calls continue the trace. When the
framework's own instrumentation (FastAPI's native tracing, an OpenTelemetry ASGI
middleware) already made the request's SERVER span, meshlib's span is an INTERNAL child
of it instead. The caller's identity is read after the handler ran, from
``scope["meshlib.peer"]`` / ``environ["meshlib.peer"]`` (the verified identity the TLS
layer puts there, or ``None``) and becomes ``service.peer.name``: only a verified
identity, never a header, since a label any caller could choose would be neither true
nor bounded. Without one, the access log line still names the caller as it names itself
(``x-mesh-source``, which meshlib clients send), marked ``"source_verified": false``: a
hint for whoever reads the log, never a label and never an authorization.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.semconv.attributes.http_attributes import HTTP_ROUTE
from opentelemetry.semconv.attributes.url_attributes import URL_PATH
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._config import MeshConfig
from ._access import INBOUND, emit
from ._instruments import SERVER_DURATION, SERVER_ROUTE_DURATION
from ._names import (
    ERROR_TYPE,
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    PEER_IDENTITY,
    SERVICE_PEER_NAME,
    SOURCE_HEADER,
    BoundedLabel,
    method_label,
)
from ._outbound import exemplar, span_ids
from ._state import STATE

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["InboundCall", "OnClose", "asgi", "peer_service", "wsgi"]

logger = logging.getLogger("meshlib.telemetry")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_RESERVED = "/mesh/"
#: routes (or paths, where the framework gives no template) for MESH_METRICS_LABELS=path
_ROUTES = BoundedLabel()
_CARRIED = {b"traceparent": "traceparent", b"tracestate": "tracestate"}
#: marks a response whose request got an injected fault (server/_faults.py sets it)
_FAULT_HEADER_TEXT = "x-mesh-fault"
_FAULT_HEADER = _FAULT_HEADER_TEXT.encode()
_SOURCE_HEADER = SOURCE_HEADER.encode()
_SOURCE_ENVIRON = "HTTP_" + SOURCE_HEADER.upper().replace("-", "_")
#: what a claimed service name may look like (else it is not shown at all)
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def claimed_source(value: str | None) -> str:
    """The service a caller says it is (``x-mesh-source``), if it looks like a name."""
    if value and _SERVICE_NAME.fullmatch(value):
        return value
    return ""


def peer_service(peer: object) -> str:
    """The service of a verified identity: a ``SpiffeId``'s ``service``, or the service
    name in a SPIFFE ID string (``spiffe://td/ns/default/dc/dc1/svc/web`` -> ``web``)."""
    service = getattr(peer, "service", None)
    if isinstance(service, str):
        return service
    if not isinstance(peer, str) or not peer.startswith("spiffe://"):
        return ""
    path = peer[len("spiffe://") :].partition("/")[2]
    marker = path.rfind("svc/")
    name = path[marker + 4 :] if marker >= 0 else path.rpartition("/")[2]
    return name if name.replace("-", "").isalnum() and len(name) <= 63 else ""


class InboundCall:
    """One inbound request: started before the mesh's stages, finished after the app."""

    __slots__ = (
        "_claimed",
        "_method",
        "_path",
        "_scheme",
        "_service",
        "_span",
        "_start",
        "_token",
        "fault",
        "status",
    )

    def __init__(
        self,
        method: str,
        path: str,
        carrier: dict[str, str],
        scheme: str = "http",
        claimed: str = "",
        service: tuple[str, str] = ("", ""),
    ) -> None:
        self._start = time.perf_counter()
        #: (name, version) of the service this process serves it as (its mesh's)
        self._service = service
        #: the caller's service as it names itself (``x-mesh-source``), unverified
        self._claimed = claimed_source(claimed)
        self._method = method
        self._path = path
        self._scheme = scheme
        #: the x-mesh-fault marker when fault injection delayed or aborted this request
        self.fault: str | None = None
        self._span: trace.Span | None = None
        self._token: object = None
        self.status: int | None = None
        try:
            tracer = STATE.tracer()
            if tracer is None and not carrier:
                return  # no span to make, no caller's context to carry
            outer = trace.get_current_span()
            if outer.is_recording():
                # The framework's own instrumentation (FastAPI's, an OpenTelemetry ASGI
                # middleware) already made this request's SERVER span from the headers:
                # ours is an INTERNAL child, as OpenTelemetry's ASGI middleware does.
                parent, kind = None, SpanKind.INTERNAL
            else:
                parent = extract(carrier) if carrier else None
                kind = SpanKind.SERVER
            if tracer is None:
                if parent is not None:
                    self._token = otel_context.attach(parent)
                return
            span = tracer.start_span(
                method,
                context=parent,
                kind=kind,
                attributes={HTTP_REQUEST_METHOD: method, URL_PATH: path},
            )
            self._span = span
            self._token = otel_context.attach(trace.set_span_in_context(span, parent))
        except Exception:
            logger.exception("inbound telemetry failed")

    def detach(self) -> None:
        """Stop being the current context (call where ``__init__`` ran)."""
        token = self._token
        if token is not None:
            self._token = None
            try:
                otel_context.detach(token)  # type: ignore[arg-type]
            except Exception:
                logger.exception("inbound telemetry failed")

    def finish(self, peer: object, route: str | None, error: BaseException | None) -> None:
        """The response is done (or ``error`` ended it); record everything."""
        try:
            duration = time.perf_counter() - self._start
            status = self.status
            error_type = type(error).__name__ if error is not None and status is None else ""
            if status is None:
                status = 500
            # error.type on every failed request (a 5xx for a server), injected faults too
            failure = error_type or (str(status) if status >= 500 else "")
            caller = "" if peer is None else peer_service(peer)
            SERVER_DURATION.record(
                duration,
                (
                    *self._service,
                    caller,
                    method_label(self._method),
                    str(status),
                    failure,
                    route or "",
                    self._scheme,
                ),
                exemplar(self._span),
            )
            if STATE.path_label and (route or status != 404):
                # an unmatched request (a 404 without a route template) never takes one of
                # the capped slots: scanners' junk paths would fill them
                SERVER_ROUTE_DURATION.record(
                    duration,
                    (
                        self._service[0],
                        method_label(self._method),
                        _ROUTES(route or self._path),
                        str(status),
                    ),
                )
            span = self._span
            if span is not None:
                if route:
                    span.update_name(f"{self._method} {route}")
                    span.set_attribute(HTTP_ROUTE, route)
                span.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
                if caller:
                    span.set_attribute(SERVICE_PEER_NAME, caller)
                if peer is not None:
                    span.set_attribute(PEER_IDENTITY, str(peer))
                if status >= 500:
                    span.set_attribute(ERROR_TYPE, error_type or str(status))
                    span.set_status(Status(StatusCode.ERROR))
                span.end()
            if STATE.access_log:
                trace_id, span_id = span_ids(span)
                emit(
                    INBOUND,
                    {
                        "direction": "inbound",
                        "trace_id": trace_id,
                        "span_id": span_id,
                        # the verified caller, else the one it claims to be (marked)
                        "source": caller or self._claimed or None,
                        "source_verified": bool(caller),
                        "peer": None if peer is None else str(peer),
                        "destination": self._service[0],
                        "method": self._method,
                        "path": self._path,
                        "status": status,
                        "error": error_type or None,
                        "fault": self.fault,
                        "duration": round(duration, 6),
                    },
                )
        except Exception:
            logger.exception("inbound telemetry failed")


def asgi(handler: ASGIApp, config: MeshConfig) -> ASGIApp:
    """``handler`` (the middleware's HTTP path) with inbound telemetry around it.

    Telemetry itself was set up by the middleware's mesh (``Mesh`` calls ``setup``)."""
    STATE.serving = True
    service = (config.service_name or "", config.service_version or "")

    async def traced(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith(_RESERVED):
            await handler(scope, receive, send)
            return
        carrier: dict[str, str] = {}
        claimed = ""
        for name, value in scope["headers"]:
            if name in _CARRIED:
                carrier[_CARRIED[name]] = value.decode("latin-1")
            elif name == _SOURCE_HEADER:
                claimed = value.decode("latin-1")
        call = InboundCall(
            scope["method"], path, carrier, scope.get("scheme", "http"), claimed, service
        )

        async def measured_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                call.status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == _FAULT_HEADER:
                        call.fault = value.decode("latin-1")
            await send(message)

        error: BaseException | None = None
        try:
            await handler(scope, receive, measured_send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.detach()
            route = getattr(scope.get("route"), "path", None)
            call.finish(scope.get("meshlib.peer"), route, error)

    return traced


def wsgi(handler: WSGIApplication, config: MeshConfig) -> WSGIApplication:
    """``handler`` (the middleware's request path) with inbound telemetry around it.

    Telemetry itself was set up by the middleware's mesh (``Mesh`` calls ``setup``)."""
    STATE.serving = True
    service = (config.service_name or "", config.service_version or "")

    def traced(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        if path.startswith(_RESERVED):
            return handler(environ, start_response)
        carrier = {}
        for key, name in (("HTTP_TRACEPARENT", "traceparent"), ("HTTP_TRACESTATE", "tracestate")):
            value = environ.get(key)
            if value:
                carrier[name] = value
        call = InboundCall(
            environ.get("REQUEST_METHOD", "GET"),
            path,
            carrier,
            environ.get("wsgi.url_scheme", "http"),
            environ.get(_SOURCE_ENVIRON, ""),
            service,
        )

        route: list[str | None] = [None]

        def measured_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            with contextlib.suppress(ValueError):
                call.status = int(status.split(" ", 1)[0])
            for name, value in headers:
                if name.lower() == _FAULT_HEADER_TEXT:
                    call.fault = value
            route[0] = _wsgi_route(environ)  # for the span's name, and route metrics
            if exc_info is None:  # PEP 3333: the third argument is optional
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        try:
            result = handler(environ, measured_start_response)
        except BaseException as exc:
            call.detach()
            call.finish(environ.get("meshlib.peer"), route[0], exc)
            raise
        call.detach()
        return OnClose(result, lambda: call.finish(environ.get("meshlib.peer"), route[0], None))

    return traced


def _wsgi_route(environ: WSGIEnvironment) -> str | None:
    """The matched route template of a Flask (Werkzeug) app, if it matched one.

    Werkzeug's ``Request`` puts itself in the environ and Flask stores the matched
    ``url_rule`` on it (``rule`` is the template, ``/forecast/<city>``); Flask removes it
    when the request context ends, so this is read when the app calls start_response.
    """
    request = environ.get("werkzeug.request")
    rule = getattr(getattr(request, "url_rule", None), "rule", None)
    return rule if isinstance(rule, str) else None


class OnClose:
    """A WSGI response iterable that calls ``on_close`` once, when the server closes it.

    The request is not over when the app returns but when its body has been sent; PEP 3333
    servers always call ``close()``. Used here to finish measuring and by the middleware to
    count the request out of flight.
    """

    def __init__(self, result: Iterable[bytes], on_close: Callable[[], object]) -> None:
        self._result = result
        self._on_close: Callable[[], object] | None = on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._result)

    def close(self) -> None:
        """Close the app's iterable, then run ``on_close`` (once)."""
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()
