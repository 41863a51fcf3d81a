"""Pure ASGI middleware (foundation stage: validates configuration, passes requests through)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .._config import MeshConfig, load_config

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ASGIMiddleware:
    """Join the mesh on the server side of an ASGI app (FastAPI, Starlette)."""

    def __init__(self, app: ASGIApp, *, config: MeshConfig | None = None) -> None:
        self.app = app
        self.config = load_config() if config is None else config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
