"""Who is calling: the verified identity of the caller of the current request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .security import SpiffeId

__all__ = ["peer_identity"]


def peer_identity(request: Any) -> SpiffeId | None:
    """The caller's SPIFFE identity, proven by its client certificate; None if it has none.

    ``request`` may be an ASGI scope, a WSGI environ, or any request object carrying one
    (Starlette/FastAPI ``Request.scope``, Flask/Werkzeug ``request.environ``). The identity
    is set by meshlib's server from the TLS handshake, never from a header.
    """
    for holder in (request, getattr(request, "scope", None), getattr(request, "environ", None)):
        if isinstance(holder, Mapping) and "meshlib.peer" in holder:
            peer = holder["meshlib.peer"]
            return peer if isinstance(peer, SpiffeId) else None
    return None
