"""The inbound side: ASGI and WSGI middleware, registration, ``meshlib serve``."""

from __future__ import annotations

from ._asgi import ASGIMiddleware
from ._wsgi import WSGIMiddleware

__all__ = ["ASGIMiddleware", "WSGIMiddleware"]
