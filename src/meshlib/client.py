"""Client / AsyncClient: real httpx clients whose transport is the mesh.

(Foundation stage: the transports validate the configuration and pass requests through;
the outbound pipeline fills them in.)
"""

from __future__ import annotations

from typing import Any

import httpx

from ._config import MeshConfig, load_config

__all__ = ["AsyncClient", "AsyncMeshTransport", "Client", "MeshTransport"]


class MeshTransport(httpx.BaseTransport):
    """The mesh as an httpx transport, wrapping an inner transport that does the I/O."""

    def __init__(
        self, inner: httpx.BaseTransport | None = None, *, config: MeshConfig | None = None
    ) -> None:
        self.config = load_config() if config is None else config
        self._inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request through the mesh."""
        return self._inner.handle_request(request)

    def close(self) -> None:
        """Close the inner transport."""
        self._inner.close()


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """The async twin of :class:`MeshTransport`."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport | None = None, *, config: MeshConfig | None = None
    ) -> None:
        self.config = load_config() if config is None else config
        self._inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request through the mesh."""
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._inner.aclose()


class Client(httpx.Client):
    """An ``httpx.Client`` that sends ``http://<service>/...`` through the mesh."""

    def __init__(self, *, transport: httpx.BaseTransport | None = None, **kwargs: Any) -> None:
        super().__init__(transport=MeshTransport(transport), **kwargs)


class AsyncClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that sends ``http://<service>/...`` through the mesh."""

    def __init__(self, *, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any) -> None:
        super().__init__(transport=AsyncMeshTransport(transport), **kwargs)
