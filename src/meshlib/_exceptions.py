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
        └── DeadlineExceeded          the whole request's deadline passed
                                      (also httpx.TimeoutException)

Request-path errors subclass ``httpx.TransportError`` so code that already says
``except httpx.RequestError`` (or ``httpx.TransportError``) keeps catching them, and
``DeadlineExceeded`` is an ``httpx.TimeoutException`` so timeout handling keeps working.
Each carries the ``service`` it concerns and says why in its message.

Errors from outside (httpx, Consul, ssl) are mapped at the boundary with
``raise ... from exc``; a request-path error the mesh did not cause (the server reset the
connection, say) reaches the caller as the original httpx error, never wrapped. When
the retry budget is spent, the caller gets the last attempt's own outcome (its response
or its error), as Envoy and Linkerd do.
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
