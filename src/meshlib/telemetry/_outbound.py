"""Telemetry of one outbound logical request: spans, metrics and the access log line.

A ``Call`` (``_pipeline.py``) owns one ``OutboundTelemetry`` and tells it what happens:
each attempt starting and ending (or cancelled: a hedge race's loser), a retry the budget
refused, and the end of the whole request (from the transports' ``finally``). Attempts
may overlap (a hedge races the attempt in flight), so each attempt's span is handed back
to the Call, which passes it in again when that attempt ends. Every hook is failsafe: an
exception here is logged and the request goes on.

Spans, when a tracer provider is installed: one CLIENT span for the logical request (child
of whatever span is current, e.g. the inbound request being served) and, under it, one
CLIENT span per attempt carrying the endpoint, the attempt number, the reason for the retry,
the breaker's state after a failure and an event when the attempt got its endpoint ejected.
``traceparent``/``tracestate`` are injected per attempt (with ``x-mesh-source``, this
process's service name, for the callee's access log), so the callee's SERVER span is a
child of the attempt that reached it. Without a provider no span is made, and an incoming
trace context is passed on unchanged.

A request that bypasses the mesh (an IP address, a host that is no mesh service) gets the
same record with ``service`` empty (``OutboundTelemetry.external``): one CLIENT span named
after the method alone (no attempt spans: there is one send and no policy), the duration
metric without ``service.peer.name`` -- the conventions' attributes only, ``server.address``
capped like an endpoint's (an IP per call would grow a series per address) -- and an access
log line whose ``destination`` is null. Its ``traceparent`` is injected as OpenTelemetry's
httpx instrumentation does; the mesh's own headers (deadline, source) are not sent.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.semconv.attributes.http_attributes import HTTP_REQUEST_RESEND_COUNT
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.url_attributes import URL_FULL
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._access import OUTBOUND, emit
from ._instruments import (
    CLIENT_ATTEMPT_DURATION,
    CLIENT_BREAKER_REFUSED,
    CLIENT_DURATION,
    CLIENT_EJECTIONS,
    CLIENT_PATH_DURATION,
    CLIENT_RETRIES,
    CLIENT_RETRY_BUDGET_EXHAUSTED,
)
from ._names import (
    ATTEMPT_CANCELLED,
    BREAKER_REFUSED_EVENT,
    BREAKER_STATE,
    ENDPOINT_EJECTED_EVENT,
    ERROR_TYPE,
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    MESH_ATTEMPT,
    MESH_ATTEMPTS,
    PEER_VERSION,
    RETRY_REASON,
    SERVICE_PEER_NAME,
    SOURCE_HEADER,
    BoundedLabel,
    method_label,
)
from ._state import STATE

if TYPE_CHECKING:
    from .._call_info import CallInfo
    from .._endpoint import Endpoint
    from .._exceptions import MeshRequestError
    from .._service import ServiceState
    from ..resilience._retry import Outcome

__all__ = ["OutboundTelemetry", "exemplar", "span_ids"]

logger = logging.getLogger("meshlib.telemetry")

#: the opt-in unbounded labels, capped per process
_ENDPOINTS = BoundedLabel()
_PATHS = BoundedLabel()
#: the hosts of requests that bypass the mesh (always recorded, so capped too)
_EXTERNAL = BoundedLabel()


class OutboundTelemetry:
    """The telemetry of one logical request to ``service``."""

    __slots__ = (
        "_address",
        "_carry",
        "_method",
        "_path",
        "_port",
        "_service",
        "_source",
        "_span",
        "_start",
        "_version",
    )

    def __init__(
        self,
        service: str,
        request: httpx.Request,
        *,
        source: str = "",
        started: float | None = None,
    ) -> None:
        """Start timing (and the CLIENT span of) ``request`` to mesh ``service`` (empty:
        a request that bypasses the mesh; see ``external``) from the service ``source``
        (this process's, per its mesh's configuration; empty for a pure client).
        ``started``: when the request began (``time.perf_counter()``), if before now
        (``failed_early``)."""
        now = time.perf_counter()
        self._start = now if started is None else started
        self._service = service
        self._source = source
        self._method = request.method
        self._version = ""
        self._span: trace.Span | None = None
        self._carry = False
        # the path: for the opt-in path metric, and for the access log line
        self._path = request.url.path if STATE.path_label or STATE.access_log else ""
        url = request.url
        self._address = url.host
        self._port = str(url.port or (443 if url.scheme == "https" else 80))
        try:
            tracer = STATE.tracer()
            if tracer is None:
                # no tracing here: pass an incoming trace on, untouched (an empty context,
                # the common case, is checked first: it is ~3x cheaper than the span lookup)
                current = otel_context.get_current()
                self._carry = bool(current) and (
                    trace.get_current_span(current).get_span_context().is_valid
                )
                return
            attributes: dict[str, str | int] = {
                HTTP_REQUEST_METHOD: self._method,
                SERVER_ADDRESS: url.host,
                URL_FULL: f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}",
            }
            if service:
                attributes[SERVICE_PEER_NAME] = service
            else:  # the only send: the port is the one the request goes to
                attributes[SERVER_PORT] = int(self._port)
            self._span = tracer.start_span(
                f"{self._method} {service}" if service else self._method,
                kind=SpanKind.CLIENT,
                attributes=attributes,
                start_time=None if started is None else time.time_ns() - int((now - started) * 1e9),
            )
        except Exception:
            logger.exception("outbound telemetry failed")

    @classmethod
    def failed_early(
        cls, request: httpx.Request, error: MeshRequestError, started: float, source: str = ""
    ) -> None:
        """``request`` to ``error.service`` failed before any attempt could start (its
        discovery, routing or a limit refused it): one CLIENT span with ``error.type`` and
        one duration observation since ``started``, as for every other failure."""
        cls(error.service, request, source=source, started=started).finish(None, None, error)

    @classmethod
    def external(cls, request: httpx.Request, source: str = "") -> OutboundTelemetry:
        """The telemetry of ``request``, which bypasses the mesh (not a mesh service):
        its trace context is injected here, as there is no attempt to inject it."""
        telemetry = cls("", request, source=source)
        try:
            if telemetry._span is not None:
                inject(request.headers, context=trace.set_span_in_context(telemetry._span))
            elif telemetry._carry:
                inject(request.headers)
        except Exception:
            logger.exception("outbound telemetry failed")
        return telemetry

    def attempt_started(
        self, request: httpx.Request, endpoint: Endpoint, number: int, retry_reason: str
    ) -> trace.Span | None:
        """An attempt on ``endpoint`` is about to be sent (``retry_reason``: why, if a retry,
        ``hedge`` for a hedge). Returns the attempt's span, to pass back when it ends."""
        try:
            self._version = endpoint.meta.get("version", "")
            if self._source:  # who is calling, for the callee's access log (unverified there)
                request.headers[SOURCE_HEADER] = self._source
            span = self._span
            if span is None:
                if self._carry:
                    inject(request.headers)
                return None
            tracer = STATE.tracer()
            if tracer is None:
                return None
            attributes: dict[str, str | int] = {
                HTTP_REQUEST_METHOD: self._method,
                SERVER_ADDRESS: endpoint.host,
                SERVER_PORT: endpoint.port,
                MESH_ATTEMPT: number,
            }
            if number > 1:
                attributes[HTTP_REQUEST_RESEND_COUNT] = number - 1
                attributes[RETRY_REASON] = retry_reason
            if self._version:
                attributes[PEER_VERSION] = self._version
            attempt = tracer.start_span(
                f"{self._method} {self._service} attempt",
                context=trace.set_span_in_context(span),
                kind=SpanKind.CLIENT,
                attributes=attributes,
            )
            inject(request.headers, context=trace.set_span_in_context(attempt))
            return attempt
        except Exception:
            logger.exception("outbound telemetry failed")
            return None

    def attempt_ended(
        self,
        service: ServiceState,
        outcome: Outcome,
        ejected: bool,
        status: int | None,
        error: BaseException | None,
        attempt: trace.Span | None,
        endpoint: Endpoint | None = None,
        started: float = 0.0,
    ) -> None:
        """The attempt (its span from ``attempt_started``) to ``endpoint``, started at
        ``started`` (``time.monotonic()``), got ``status`` or failed with ``error``;
        ``ejected``: it cost the endpoint its place in load balancing."""
        try:
            if ejected:
                CLIENT_EJECTIONS.add((self._source, self._service))
            if STATE.endpoint_label and endpoint is not None:
                CLIENT_ATTEMPT_DURATION.record(
                    time.monotonic() - started,
                    (
                        self._source,
                        self._service,
                        *_endpoint_labels(endpoint),
                        "" if status is None else str(status),
                        "" if error is None else _error_type(error),
                    ),
                )
            if attempt is None:
                return
            if status is not None:
                attempt.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
            if outcome.failure:
                attempt.set_attribute(
                    ERROR_TYPE, type(error).__name__ if error is not None else str(status)
                )
                attempt.set_attribute(BREAKER_STATE, service.breaker.state)
                attempt.set_status(Status(StatusCode.ERROR, outcome.reason))
            if ejected:
                attempt.add_event(ENDPOINT_EJECTED_EVENT, {SERVICE_PEER_NAME: self._service})
            attempt.end()
        except Exception:
            logger.exception("outbound telemetry failed")

    def attempt_cancelled(self, attempt: trace.Span | None) -> None:
        """The attempt was abandoned before it ended: it lost a hedge race, or the request
        was cut short. Its span ends marked ``meshlib.attempt.cancelled``, not as an error."""
        try:
            if attempt is not None:
                attempt.set_attribute(ATTEMPT_CANCELLED, True)
                attempt.end()
        except Exception:
            logger.exception("outbound telemetry failed")

    def budget_exhausted(self) -> None:
        """A retryable outcome was not retried: the retry budget was spent."""
        try:
            CLIENT_RETRY_BUDGET_EXHAUSTED.add((self._source, self._service))
        except Exception:
            logger.exception("outbound telemetry failed")

    def finish(
        self, info: CallInfo | None, response: httpx.Response | None, error: BaseException | None
    ) -> None:
        """The logical request ended with ``response`` or ``error``: record it all
        (``info``: what the mesh did; None for a request that bypassed it)."""
        try:
            duration = time.perf_counter() - self._start
            source = self._source
            status = response.status_code if response is not None else None
            error_type = "" if status is not None else _error_type(error)
            address, port = self._address, self._port
            if not self._service:
                address, port = _bounded_address(address, port)
            CLIENT_DURATION.record(
                duration,
                (
                    source,
                    self._service,
                    self._version,
                    method_label(self._method),
                    "" if status is None else str(status),
                    # error.type on every failed request: a 4xx or 5xx for a client
                    error_type or (str(status) if status is not None and status >= 400 else ""),
                    address,
                    port,
                ),
                exemplar(self._span),
            )
            if STATE.path_label and self._path:
                CLIENT_PATH_DURATION.record(
                    duration,
                    (
                        source,
                        self._service,
                        method_label(self._method),
                        _PATHS(self._path),
                        "" if status is None else str(status),
                    ),
                )
            for reason in info.retry_reasons if info is not None else ():
                CLIENT_RETRIES.add((source, self._service, reason))
            if error_type == "CircuitOpen":
                CLIENT_BREAKER_REFUSED.add((source, self._service))
            span = self._span
            if span is not None:
                self._end_span(span, info, status, error_type, error)
            if STATE.access_log:
                self._log(info, status, error_type, duration, span)
        except Exception:
            logger.exception("outbound telemetry failed")

    def _end_span(
        self,
        span: trace.Span,
        info: CallInfo | None,
        status: int | None,
        error_type: str,
        error: BaseException | None,
    ) -> None:
        if info is not None:
            span.set_attribute(MESH_ATTEMPTS, info.attempts)
        if status is not None:
            span.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
            if status >= 500:
                span.set_attribute(ERROR_TYPE, str(status))
                span.set_status(Status(StatusCode.ERROR))
        else:
            span.set_attribute(ERROR_TYPE, error_type)
            if error_type == "CircuitOpen":
                span.add_event(BREAKER_REFUSED_EVENT)
            span.set_status(Status(StatusCode.ERROR, str(error) if error else None))
        span.end()

    def _log(
        self,
        info: CallInfo | None,
        status: int | None,
        error_type: str,
        duration: float,
        span: trace.Span | None,
    ) -> None:
        trace_id, span_id = span_ids(span)
        emit(
            OUTBOUND,
            {
                "direction": "outbound",
                "trace_id": trace_id,
                "span_id": span_id,
                "source": self._source,
                "destination": self._service or None,
                "method": self._method,
                "path": self._path,
                "status": status,
                "error": error_type or None,
                "duration": round(duration, 6),
                "attempts": 1 if info is None else info.attempts,
                "retry_reasons": [] if info is None else info.retry_reasons,
                "endpoint": f"{self._address}:{self._port}" if info is None else info.endpoint,
            },
        )


def span_ids(span: trace.Span | None) -> tuple[str, str]:
    """Hex trace and span id of ``span`` (else of the current span), or empty strings."""
    context = (span or trace.get_current_span()).get_span_context()
    if not context.is_valid:
        return "", ""
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def exemplar(span: trace.Span | None) -> tuple[str, str] | None:
    """The hex trace and span id of ``span`` for a histogram exemplar, or None when there
    is no span or its trace is not sampled (an exemplar must lead to a stored trace)."""
    if span is None:
        return None
    context = span.get_span_context()
    if not context.trace_flags.sampled:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def _endpoint_labels(endpoint: Endpoint) -> tuple[str, str]:
    """The server.address and server.port labels, capped together (by the address)."""
    if _ENDPOINTS(endpoint.address) == "_OTHER":
        return "_OTHER", "_OTHER"
    return endpoint.host, str(endpoint.port)


def _bounded_address(host: str, port: str) -> tuple[str, str]:
    """A bypassing request's server.address and server.port, capped together."""
    if _EXTERNAL(f"{host}:{port}") == "_OTHER":
        return "_OTHER", "_OTHER"
    return host, port


def _error_type(error: BaseException | None) -> str:
    if error is None:
        return "_OTHER"
    return type(error).__name__
