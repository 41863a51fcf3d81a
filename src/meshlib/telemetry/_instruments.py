"""The metrics meshlib records: names, units, labels (the reference table in the docs).

Label values are bounded: service names, versions, methods (unknown ones as ``_OTHER``),
status codes, error types, retry reasons and breaker states. The three instruments at the
end carry unbounded labels (endpoint addresses, URL paths): they are recorded only when
``MESH_METRICS_LABELS`` asks for them, and each such label is capped (``BoundedLabel``).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from opentelemetry.semconv.metrics.http_metrics import (
    HTTP_CLIENT_REQUEST_DURATION,
    HTTP_SERVER_REQUEST_DURATION,
)

from .._version import __version__
from ._metrics import REGISTRY, Labels
from ._names import (
    BREAKER_STATE,
    ENDPOINT_STATE,
    ERROR_TYPE,
    FAULT_KIND,
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
    LIMIT_SCOPE,
    PEER_VERSION,
    RETRY_REASON,
    SERVER_ADDRESS,
    SERVER_PORT,
    SERVICE_NAME,
    SERVICE_PEER_NAME,
    SERVICE_VERSION,
    URL_PATH,
    URL_SCHEME,
)

if TYPE_CHECKING:
    from .._service import ServiceState

__all__ = [
    "BUILD_INFO",
    "CERTIFICATE_EXPIRY",
    "CLIENT_ATTEMPT_DURATION",
    "CLIENT_DURATION",
    "CLIENT_EJECTIONS",
    "CLIENT_PATH_DURATION",
    "CLIENT_RETRIES",
    "CLIENT_RETRY_BUDGET_EXHAUSTED",
    "RETRY_REASONS",
    "SERVER_DURATION",
    "SERVER_FAULTS",
    "SERVER_LOAD_SHED",
    "SERVER_RATE_LIMITED",
    "SERVER_ROUTE_DURATION",
]

_EDGE = (SERVICE_NAME, SERVICE_PEER_NAME)

#: every value of meshlib.retry.reason (resilience/_retry.py and hedging)
RETRY_REASONS = (
    "connect",
    "reset",
    "timeout",
    "pool",
    "429",
    "502",
    "503",
    "504",
    "overloaded",
    "hedge",
)


# Baselines: the counters' series that exist at zero before their first event -- per
# destination once this process has called it, per service once it serves.


def _edges() -> Iterator[Labels]:
    for source, state in _services():
        yield source, state.name


def _edge_reasons() -> Iterator[Labels]:
    for edge in _edges():
        for reason in RETRY_REASONS:
            yield (*edge, reason)


def _served() -> Iterator[Labels]:
    from ._state import STATE  # imported late: no cycle

    if STATE.serving:
        yield (STATE.source,)


def _served_faults() -> Iterator[Labels]:
    for (service,) in _served():
        yield service, "delay"
        yield service, "abort"


def _served_limits() -> Iterator[Labels]:
    for (service,) in _served():
        yield service, "", "global"
        yield service, "", "source"


CLIENT_DURATION = REGISTRY.histogram(
    HTTP_CLIENT_REQUEST_DURATION,
    "s",
    "Duration of logical outbound requests (all attempts and backoff), by source and "
    "destination service; server.address and server.port are the URL's (the service name "
    "for mesh calls), never an endpoint's.",
    (
        SERVICE_NAME,
        SERVICE_PEER_NAME,
        PEER_VERSION,
        HTTP_REQUEST_METHOD,
        HTTP_RESPONSE_STATUS_CODE,
        ERROR_TYPE,
        SERVER_ADDRESS,
        SERVER_PORT,
    ),
)
SERVER_DURATION = REGISTRY.histogram(
    HTTP_SERVER_REQUEST_DURATION,
    "s",
    "Duration of inbound requests, by this service, its version, the caller's verified "
    "service and the matched route template (none for unmatched requests).",
    (
        SERVICE_NAME,
        SERVICE_VERSION,
        SERVICE_PEER_NAME,
        HTTP_REQUEST_METHOD,
        HTTP_RESPONSE_STATUS_CODE,
        ERROR_TYPE,
        HTTP_ROUTE,
        URL_SCHEME,
    ),
)
SERVER_RATE_LIMITED = REGISTRY.counter(
    "meshlib.server.rate_limited",
    "1",
    "Inbound requests refused with 429 by a rate limit, by this service, the caller's "
    "verified service ('' without one) and the limit (global or source).",
    (SERVICE_NAME, SERVICE_PEER_NAME, LIMIT_SCOPE),
    _served_limits,
)
SERVER_LOAD_SHED = REGISTRY.counter(
    "meshlib.server.load_shed",
    "1",
    "Inbound requests shed with 503 by MESH_MAX_CONCURRENT_REQUESTS before the handler ran.",
    (SERVICE_NAME,),
    _served,
)
SERVER_FAULTS = REGISTRY.counter(
    "meshlib.server.faults",
    "1",
    "Faults injected into inbound requests (MESH_FAULT_*), by kind (delay or abort).",
    (SERVICE_NAME, FAULT_KIND),
    _served_faults,
)
CLIENT_RETRIES = REGISTRY.counter(
    "meshlib.client.retries",
    "1",
    "Retries made, by destination and reason.",
    (*_EDGE, RETRY_REASON),
    _edge_reasons,
)
CLIENT_RETRY_BUDGET_EXHAUSTED = REGISTRY.counter(
    "meshlib.client.retry_budget.exhausted",
    "1",
    "Retries not made because the destination's retry budget was spent.",
    _EDGE,
    _edges,
)
CLIENT_BREAKER_REFUSED = REGISTRY.counter(
    "meshlib.client.breaker.refused",
    "1",
    "Requests failed fast by an open circuit breaker.",
    _EDGE,
    _edges,
)
CLIENT_EJECTIONS = REGISTRY.counter(
    "meshlib.client.ejections",
    "1",
    "Endpoints ejected from load balancing by outlier detection.",
    _EDGE,
    _edges,
)


#: Where the gauges read the process's state, registered by the state's owners as they
#: load (``_runtime``: the destinations of its live meshes; ``security``: the certificates
#: in use), so telemetry imports nothing above it.
_SERVICE_STATES: list[Callable[[], Iterable[tuple[str, ServiceState]]]] = []
_CERTIFICATES: list[Callable[[], Iterable[tuple[str, float]]]] = []


def report_service_states(source: Callable[[], Iterable[tuple[str, ServiceState]]]) -> None:
    """Let the client gauges read ``source()``: (calling service, destination's state)
    pairs, when scraped."""
    _SERVICE_STATES.append(source)


def report_certificates(source: Callable[[], Iterable[tuple[str, float]]]) -> None:
    """Let the certificate gauge read ``source()``: (service, expiry timestamp) pairs."""
    _CERTIFICATES.append(source)


def _services() -> Iterator[tuple[str, ServiceState]]:
    for source in _SERVICE_STATES:
        yield from source()


def _breaker_states() -> Iterator[tuple[Labels, float]]:
    for source, state in _services():
        current = state.breaker.state
        for name in ("closed", "open", "half-open"):
            yield (source, state.name, name), 1.0 if current == name else 0.0


def _endpoints() -> Iterator[tuple[Labels, float]]:
    import time

    now = time.monotonic()
    for source, state in _services():
        endpoints = state.endpoints
        ejected = sum(1 for s in endpoints if s.ejected_until > now)
        yield (source, state.name, "healthy"), float(len(endpoints) - ejected)
        yield (source, state.name, "ejected"), float(ejected)


def _in_flight() -> Iterator[tuple[Labels, float]]:
    for source, state in _services():
        endpoints = state.endpoints
        yield (source, state.name), float(sum(s.in_flight for s in endpoints))


CLIENT_BREAKER_STATE = REGISTRY.gauge(
    "meshlib.client.breaker.state",
    "1",
    "1 for the circuit breaker's current state (closed, open, half-open), 0 for the others.",
    (*_EDGE, BREAKER_STATE),
    _breaker_states,
)
CLIENT_ENDPOINTS = REGISTRY.gauge(
    "meshlib.client.endpoints",
    "1",
    "Endpoints of each destination discovery reports healthy, split into those load "
    "balancing may use (healthy) and those outlier detection ejected (ejected).",
    (*_EDGE, ENDPOINT_STATE),
    _endpoints,
)
CLIENT_IN_FLIGHT = REGISTRY.gauge(
    "meshlib.client.requests.in_flight",
    "1",
    "Attempts in flight to each destination.",
    _EDGE,
    _in_flight,
)


def _certificates() -> Iterator[tuple[Labels, float]]:
    for source in _CERTIFICATES:
        for service, expiry in source():
            yield (service,), expiry


CERTIFICATE_EXPIRY = REGISTRY.gauge(
    "meshlib.certificate.expiry",
    "s",
    "When this process's current mesh certificate expires, as a Unix timestamp in seconds.",
    (SERVICE_NAME,),
    _certificates,
)


def _build_info() -> Iterator[tuple[Labels, float]]:
    from ._state import STATE  # imported late: no cycle

    yield (STATE.source, __version__, platform.python_version()), 1.0


BUILD_INFO = REGISTRY.gauge(
    "meshlib.build.info",
    "1",
    "Always 1; its labels say which meshlib and Python this process runs.",
    (SERVICE_NAME, "meshlib.version", "process.runtime.version"),
    _build_info,
)


# ---- opt-in (MESH_METRICS_LABELS): unbounded labels, capped per process

CLIENT_ATTEMPT_DURATION = REGISTRY.histogram(
    "meshlib.client.attempt.duration",
    "s",
    "Duration of each attempt, by the endpoint (address and port) it went to. Recorded "
    "only with MESH_METRICS_LABELS=endpoint.",
    (*_EDGE, SERVER_ADDRESS, SERVER_PORT, HTTP_RESPONSE_STATUS_CODE, ERROR_TYPE),
)
CLIENT_PATH_DURATION = REGISTRY.histogram(
    "meshlib.client.path.duration",
    "s",
    "Duration of logical outbound requests by URL path. Recorded only with "
    "MESH_METRICS_LABELS=path.",
    (*_EDGE, HTTP_REQUEST_METHOD, URL_PATH, HTTP_RESPONSE_STATUS_CODE),
)
SERVER_ROUTE_DURATION = REGISTRY.histogram(
    "meshlib.server.route.duration",
    "s",
    "Duration of inbound requests by route: the framework's route template, else the URL "
    "path. Recorded only with MESH_METRICS_LABELS=path.",
    (SERVICE_NAME, HTTP_REQUEST_METHOD, HTTP_ROUTE, HTTP_RESPONSE_STATUS_CODE),
)
