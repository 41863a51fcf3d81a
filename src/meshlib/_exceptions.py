"""The errors meshlib raises.

The tree::

    MeshError                         every error meshlib raises on purpose
    ├── ConfigError                   a bad environment value, at start-up (also ValueError)
    └── MeshRequestError              the request path; also httpx.TransportError
        ├── NoHealthyEndpoints        discovery knows no healthy instance of the service
        ├── CircuitOpen               the service's breaker is open: failing fast
        ├── IdentityMismatch          the server's certificate is not the service's identity
        ├── UntrustedCertificate      the TLS handshake failed: the two sides trust different
        │                             CAs (also httpx.ConnectError)
        ├── EgressDenied              the host is outside the mesh and egress does not allow it
        ├── DeadlineExceeded          the whole request's deadline passed
        │                             (also httpx.TimeoutException)
        └── RequestFailed             the mesh stopped trying: the last attempt's error,
                                      also an instance of that error's own httpx class

Request-path errors subclass ``httpx.TransportError`` so code that already says
``except httpx.RequestError`` (or ``httpx.TransportError``) keeps catching them, and
``DeadlineExceeded`` is an ``httpx.TimeoutException`` so timeout handling keeps working.
Each carries the ``service`` it concerns and says why in its message.

Errors from outside (httpx, Consul, ssl) are mapped at the boundary with
``raise ... from exc``. When the mesh stops trying a request whose attempts failed (no
retries left, the error or the method not retryable, the budget spent), the caller gets
the last attempt's error as a ``RequestFailed`` that is also of that error's own httpx
class (a refused connection is still an ``httpx.ConnectError``, a read timeout still an
``httpx.ReadTimeout``), naming the service, the attempts and the endpoints tried, with
the httpx error as its ``__cause__``. A last attempt that got a response (a 503 after
the retries) is that response, as Envoy and Linkerd do.
"""

from __future__ import annotations

import httpx

__all__ = [
    "CircuitOpen",
    "ConfigError",
    "DeadlineExceeded",
    "EgressDenied",
    "IdentityMismatch",
    "MeshError",
    "MeshRequestError",
    "NoHealthyEndpoints",
    "RequestFailed",
    "UntrustedCertificate",
]


class MeshError(Exception):
    """Base class of every error meshlib raises on purpose."""


class ConfigError(MeshError, ValueError):
    """The configuration is invalid; raised when a client, middleware or server starts.

    The message has one line per bad value, each naming the variable, the value and what
    was expected. ``errors`` holds those lines.
    """

    def __init__(self, errors: list[str] | str) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


class MeshRequestError(MeshError, httpx.TransportError):
    """A request could not be sent because of the mesh's own decision.

    ``service`` is the mesh service the request was for.
    """

    def __init__(
        self,
        message: str,
        *,
        service: str,
        request: httpx.Request | None = None,
    ) -> None:
        super().__init__(message, request=request)
        self.service = service


class NoHealthyEndpoints(MeshRequestError):
    """Discovery knows no healthy instance of the service (or none that may be tried)."""


class CircuitOpen(MeshRequestError):
    """The service's circuit breaker is open, so the request failed fast without a try."""


class IdentityMismatch(MeshRequestError):
    """The endpoint's verified certificate names another identity than the service chosen.

    Raised before any byte of the request is written, so the attempt is retried on another
    endpoint like a connect failure.
    """


class UntrustedCertificate(MeshRequestError, httpx.ConnectError):
    """The mTLS handshake with an endpoint failed on trust: its certificate is not from the
    CA this process trusts, or it refused this process's certificate for that reason.

    The message names where this process's trust comes from (``MESH_TLS_DIR`` or Consul's
    Connect CA). Nothing was sent, so the attempt is retried on another endpoint like a
    connect failure.
    """


class EgressDenied(MeshRequestError):
    """The host is not a mesh service and ``MESH_EGRESS`` does not allow it; no connection
    was opened. ``service`` is the host."""


class DeadlineExceeded(MeshRequestError, httpx.TimeoutException):
    """The request's overall deadline passed (across every attempt and backoff)."""


class RequestFailed(MeshRequestError):
    """The mesh stopped trying: every attempt failed, or the last may not be repeated.

    Raised as an instance of a subclass of both this class and the last attempt's httpx
    error class (``RequestFailed.wrapping``), so ``except httpx.ConnectError`` and
    ``except httpx.TimeoutException`` keep catching what they caught. ``attempts`` is how
    many were made, ``endpoints`` the ``host:port`` of each in order, ``reason`` why no
    other attempt followed; ``__cause__`` is the last attempt's own error.
    """

    attempts: int
    endpoints: tuple[str, ...]
    reason: str

    @classmethod
    def wrapping(
        cls,
        error: httpx.TransportError,
        *,
        service: str,
        endpoints: tuple[str, ...],
        reason: str,
    ) -> RequestFailed:
        """The ``RequestFailed`` for ``error``, an instance of ``error``'s class too."""
        kind = _kind(type(error))
        count = len(endpoints)
        tried = ", ".join(dict.fromkeys(endpoints))
        detail = str(error) or type(error).__name__
        failed = kind(
            f"service {service!r}: {count} attempt{'s' if count != 1 else ''} failed "
            f"(on {tried}); {reason}; the last: {type(error).__name__}: {detail}",
            service=service,
            request=error._request,
        )
        failed.attempts = count
        failed.endpoints = endpoints
        failed.reason = reason
        return failed

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled as the httpx class it also is (the made class has no importable name)."""
        base = next(k for k in type(self).__mro__ if k.__module__.startswith("httpx"))
        return (_rebuild, (base, str(self), self.service, self.endpoints, self.reason))


def _rebuild(
    base: type[httpx.TransportError],
    message: str,
    service: str,
    endpoints: tuple[str, ...],
    reason: str,
) -> RequestFailed:
    failed = _kind(base)(message, service=service)
    failed.attempts, failed.endpoints, failed.reason = len(endpoints), endpoints, reason
    return failed


def _kind(base: type[httpx.TransportError]) -> type[RequestFailed]:
    """The class both ``RequestFailed`` and ``base``, made once per ``base``.

    It is named as the httpx class (metrics' and spans' ``error.type``, access logs and code
    reading ``type(e).__name__`` see "ConnectError" as before); a traceback shows the
    qualified name, ``RequestFailed[ConnectError]``.
    """
    kind = _KINDS.get(base)
    if kind is None:
        name = base.__name__
        namespace = {"__qualname__": f"RequestFailed[{name}]", "__module__": __name__}
        kind = _KINDS.setdefault(base, type(name, (RequestFailed, base), namespace))
    return kind


#: httpx error class -> its RequestFailed class (made once each)
_KINDS: dict[type[httpx.TransportError], type[RequestFailed]] = {}
