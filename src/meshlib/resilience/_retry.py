"""Which outcomes are retried, and how long to wait before the next attempt.

Retries are only safe when the request can be replayed without harm:

* nothing reached the server (a connect failure): any method, any replayable body;
* the server may have seen the request (a reset, a timeout, a 502/503/504): only
  idempotent methods (RFC 9110: GET, HEAD, OPTIONS, TRACE, PUT, DELETE), a request with an
  ``Idempotency-Key`` header, or a caller who opted in per request;
* a meshlib server shed the request before its handler ran (503 with
  ``x-mesh-overloaded: true``, as Envoy marks its own with ``x-envoy-overloaded``): like a
  connect failure, any method may go to another instance at once. The shedding instance is
  busy, not broken, so this is no failure for ejection or the breaker (ejecting busy
  instances would pile their load onto the rest), and its ``Retry-After`` -- how long *it*
  needs -- does not delay the try elsewhere.

A refused connection (``REFUSED``) is a connect failure with news in it: nothing listens
at that address, so the outlier stage ejects the endpoint at once instead of counting.

Backoff is exponential with full jitter (AWS's analysis: it spreads retries best); a
``Retry-After`` from the server replaces it when present. Written here rather than with
tenacity because this runs per attempt on the request path, where a precomputed loop costs
~0.1 µs against tenacity's 5-27 µs (FINDINGS.md). The control plane's retries live in its
blocking-query loops (``meshlib.consul``), so tenacity is not a dependency.
"""

from __future__ import annotations

import email.utils
import random
import time
from typing import Final, NamedTuple

import httpx

from .._exceptions import IdentityMismatch

__all__ = [
    "IDEMPOTENT_METHODS",
    "OVERLOADED",
    "OVERLOADED_HEADER",
    "REFUSED",
    "RETRYABLE_STATUS",
    "Outcome",
    "backoff",
    "classify_error",
    "classify_response",
    "parse_retry_after",
]

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
RETRYABLE_STATUS: Final = frozenset({502, 503, 504})
#: Set by a meshlib server on a 503 it answered without running the handler (load shed).
OVERLOADED_HEADER: Final = "x-mesh-overloaded"


class Outcome(NamedTuple):
    """What one attempt's result means to the retry, outlier and breaker stages."""

    #: The endpoint misbehaved (counts towards ejection and the breaker).
    failure: bool
    #: The outcome may be retried at all.
    retryable: bool
    #: Bytes of the request may have reached the server (so only safe requests retry).
    sent: bool
    #: Short label for logs and metrics: "connect", "reset", "timeout", "503", ...
    reason: str


#: A connection refused: nothing listens there (the process died or has not started).
REFUSED: Final = Outcome(failure=True, retryable=True, sent=False, reason="connect")
_SUCCESS = Outcome(failure=False, retryable=False, sent=True, reason="")
#: A request shed by a meshlib server before its handler ran.
OVERLOADED = Outcome(failure=False, retryable=True, sent=False, reason="overloaded")


def classify_response(response: httpx.Response) -> Outcome:
    """Classify an attempt that produced a response (so the request was sent)."""
    status = response.status_code
    if status < 500:
        if status == 429 and "retry-after" in response.headers:
            return Outcome(failure=False, retryable=True, sent=True, reason="429")
        return _SUCCESS
    if status == 503 and response.headers.get(OVERLOADED_HEADER) == "true":
        return OVERLOADED
    return Outcome(
        failure=True, retryable=status in RETRYABLE_STATUS, sent=True, reason=str(status)
    )


def retryable_by_route(conditions: frozenset[str], outcome: Outcome, status: int | None) -> bool:
    """Whether a route's Consul ``RetryOn`` conditions (Envoy's ``retry_on``) retry this.

    They replace meshlib's own rules for the route: ``5xx`` (any 5xx, no response at all,
    connect failures), ``gateway-error`` (502, 503, 504), ``reset`` (the connection broke
    or timed out after sending), ``connect-failure`` (also ``RetryOnConnectFailure``),
    ``retriable-4xx`` (409). Outcomes where nothing reached the server through no fault of
    its own (meshlib's pool full, a meshlib server shedding load) stay retryable. The
    gRPC conditions, ``refused-stream`` and ``envoy-ratelimited`` never occur on meshlib's
    HTTP/1.1 calls and retry nothing.
    """
    if outcome.reason in ("pool", "overloaded"):
        return True
    if status is None:
        if outcome.reason in ("connect", "identity"):
            return "connect-failure" in conditions or "5xx" in conditions
        if outcome.reason in ("reset", "timeout"):
            return "reset" in conditions or "5xx" in conditions
        return False
    if status >= 500 and "5xx" in conditions:
        return True
    if status in RETRYABLE_STATUS and "gateway-error" in conditions:
        return True
    return status == 409 and "retriable-4xx" in conditions


def classify_error(exc: httpx.TransportError) -> Outcome:
    """Classify an attempt that failed without a response."""
    if isinstance(exc, httpx.ConnectError) and _refused(exc):
        return REFUSED
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return Outcome(failure=True, retryable=True, sent=False, reason="connect")
    if isinstance(exc, IdentityMismatch):
        # Checked after the handshake, before the request is written: nothing was sent,
        # and an endpoint proving the wrong identity is misrouted: eject it, go elsewhere.
        return Outcome(failure=True, retryable=True, sent=False, reason="identity")
    if isinstance(exc, httpx.PoolTimeout):
        # Our own pool was full: nothing was sent and the endpoint did nothing wrong.
        return Outcome(failure=False, retryable=True, sent=False, reason="pool")
    if isinstance(exc, httpx.TimeoutException):
        return Outcome(failure=True, retryable=True, sent=True, reason="timeout")
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        return Outcome(failure=True, retryable=True, sent=True, reason="reset")
    # UnsupportedProtocol, ProxyError, LocalProtocolError and the like: our side's fault.
    return Outcome(failure=False, retryable=False, sent=True, reason=type(exc).__name__)


def _refused(exc: BaseException) -> bool:
    """Whether a ``ConnectionRefusedError`` is among the causes of ``exc`` (httpcore wraps
    it once or twice; anyio puts it under "All connection attempts failed")."""
    seen: BaseException | None = exc
    for _ in range(8):  # a bounded walk: cause chains can loop
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def backoff(retry: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before retry number ``retry`` (1-based)."""
    ceiling = min(cap, base * (2 ** (retry - 1)))
    return (rng or random).uniform(0, ceiling)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date).

    Returns ``None`` for a missing or malformed header (which is then ignored).
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is True; float("²") raises
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    now = time.time() if now is None else now
    return max(when.timestamp() - now, 0.0)
