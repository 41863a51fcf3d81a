"""meshlib: a proxyless service mesh for Python.

Call other services by name with :class:`Client` / :class:`AsyncClient` (real httpx
clients), and join the mesh on the server side with :class:`ASGIMiddleware` or
:class:`WSGIMiddleware`. Everything is configured by environment variables; see
docs/configuration.md.
"""

from __future__ import annotations

from ._exceptions import (
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    MeshError,
    MeshRequestError,
    NoHealthyEndpoints,
)
from ._version import __version__
from .client import AsyncClient, AsyncMeshTransport, Client, MeshTransport
from .server import ASGIMiddleware, WSGIMiddleware

__all__ = [
    "ASGIMiddleware",
    "AsyncClient",
    "AsyncMeshTransport",
    "CircuitOpen",
    "Client",
    "ConfigError",
    "DeadlineExceeded",
    "MeshError",
    "MeshRequestError",
    "MeshTransport",
    "NoHealthyEndpoints",
    "WSGIMiddleware",
    "__version__",
]
