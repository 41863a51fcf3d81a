"""meshlib: a proxyless service mesh for Python.

Call other services by name with :class:`Client` / :class:`AsyncClient` (real httpx
clients), and join the mesh on the server side with :class:`ASGIMiddleware` or
:class:`WSGIMiddleware`; all of them share the process's :class:`Mesh` for their
configuration unless given one of their own. Everything is configured by environment variables; see
docs/configuration.md.
"""

from __future__ import annotations

from ._exceptions import (
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    EgressDenied,
    IdentityMismatch,
    MeshError,
    MeshRequestError,
    NoHealthyEndpoints,
    RequestFailed,
    UntrustedCertificate,
)
from ._peer import peer_identity
from ._runtime import Mesh
from ._version import __version__
from .client import AsyncClient, AsyncMeshTransport, Client, MeshTransport
from .security import SpiffeId
from .server import ASGIMiddleware, WSGIMiddleware

__all__ = [
    "ASGIMiddleware",
    "AsyncClient",
    "AsyncMeshTransport",
    "CircuitOpen",
    "Client",
    "ConfigError",
    "DeadlineExceeded",
    "EgressDenied",
    "IdentityMismatch",
    "Mesh",
    "MeshError",
    "MeshRequestError",
    "MeshTransport",
    "NoHealthyEndpoints",
    "RequestFailed",
    "SpiffeId",
    "UntrustedCertificate",
    "WSGIMiddleware",
    "__version__",
    "peer_identity",
]
