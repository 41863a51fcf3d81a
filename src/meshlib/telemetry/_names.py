"""Names of meshlib's telemetry: span and metric attributes, metric names, logger names.

Standard names come from the ``opentelemetry.semconv`` constants; meshlib's own, for
things the conventions have no name for (retry reasons, breaker states, the peer's
version), are written once here under ``meshlib.``. A Prometheus label is the attribute
name with every character other than a letter, digit or ``_`` turned into ``_``, as the
OpenTelemetry Prometheus exporter names them (``service.peer.name`` -> ``service_peer_name``).
"""

from __future__ import annotations

import re
from typing import Final

from opentelemetry.semconv._incubating.attributes.service_attributes import SERVICE_PEER_NAME
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
)
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.service_attributes import SERVICE_NAME, SERVICE_VERSION
from opentelemetry.semconv.attributes.url_attributes import URL_PATH, URL_SCHEME

__all__ = [
    "ATTEMPT_CANCELLED",
    "BREAKER_REFUSED_EVENT",
    "BREAKER_STATE",
    "ENDPOINT_EJECTED_EVENT",
    "ENDPOINT_STATE",
    "ERROR_TYPE",
    "FAULT_KIND",
    "HTTP_REQUEST_METHOD",
    "HTTP_RESPONSE_STATUS_CODE",
    "HTTP_ROUTE",
    "LIMIT_SCOPE",
    "MESH_ATTEMPT",
    "MESH_ATTEMPTS",
    "PEER_IDENTITY",
    "PEER_VERSION",
    "RETRY_REASON",
    "SERVER_ADDRESS",
    "SERVER_PORT",
    "SERVICE_NAME",
    "SERVICE_PEER_NAME",
    "SERVICE_VERSION",
    "SOURCE_HEADER",
    "URL_PATH",
    "URL_SCHEME",
    "BoundedLabel",
    "method_label",
    "prometheus_name",
]

#: The version (subset) of the endpoint that answered a client request.
PEER_VERSION: Final = "meshlib.peer.version"
#: The caller's verified identity (its SPIFFE ID) on a SERVER span.
PEER_IDENTITY: Final = "meshlib.peer.identity"
#: Why a retry happened: connect, reset, timeout, 503, ...
RETRY_REASON: Final = "meshlib.retry.reason"
#: A circuit breaker's state: closed, open, half-open.
BREAKER_STATE: Final = "meshlib.breaker.state"
#: healthy or ejected, for the endpoint gauge.
ENDPOINT_STATE: Final = "meshlib.endpoint.state"
#: The 1-based number of an attempt within its logical request.
MESH_ATTEMPT: Final = "meshlib.attempt"
#: How many attempts a logical request took.
MESH_ATTEMPTS: Final = "meshlib.attempts"
#: Which rate limit refused an inbound request: global or source.
LIMIT_SCOPE: Final = "meshlib.limit.scope"
#: An injected fault: delay or abort.
FAULT_KIND: Final = "meshlib.fault.kind"
#: On an attempt span: the attempt was abandoned (a hedge race's loser), not failed.
ATTEMPT_CANCELLED: Final = "meshlib.attempt.cancelled"
#: The request header a meshlib client names its own service in (``MESH_SERVICE_NAME``),
#: on every attempt to a mesh service. A claim, not an identity: any caller can send it,
#: so it is only ever shown as unverified (inbound access log lines), never a metric label
#: and never used to authorize (identity comes from the client certificate alone).
SOURCE_HEADER: Final = "x-mesh-source"
#: Span events.
ENDPOINT_EJECTED_EVENT: Final = "meshlib.endpoint.ejected"
BREAKER_REFUSED_EVENT: Final = "meshlib.breaker.refused"

_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_NOT_LABEL = re.compile(r"[^A-Za-z0-9_]")


def method_label(method: str) -> str:
    """The method as a bounded label: a known method, else ``_OTHER`` (semconv's rule)."""
    return method if method in _KNOWN_METHODS else "_OTHER"


def prometheus_name(name: str) -> str:
    """``http.client.request.duration`` -> ``http_client_request_duration``."""
    return _NOT_LABEL.sub("_", name)


class BoundedLabel:
    """The values of an opt-in unbounded label (paths, endpoint addresses), capped.

    The first ``limit`` distinct values are kept; later new ones become ``_OTHER``, so a
    crawler walking random URLs grows a scrape by one series, not by one per URL (the
    OpenTelemetry SDK caps cardinality the same way, with an overflow series).
    """

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int = 500) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        """``value`` if it is (or can still become) one of the kept values, else ``_OTHER``."""
        seen = self._seen
        if value in seen:
            return value
        if len(seen) >= self._limit:
            return "_OTHER"
        seen.add(value)  # a race may keep a few more than limit: harmless
        return value
