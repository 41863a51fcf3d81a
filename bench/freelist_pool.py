"""An experiment for row 2: httpx's async transport with a simpler connection pool.

httpcore's ``AsyncConnectionPool`` re-examines every queued request against every
connection (and asks each idle connection's socket whether it is readable) each time a
request starts or ends, so its cost per request grows with the requests in flight. This
pool keeps a last-in-first-out list of idle HTTP/1.1 connections per origin: a request
takes one (or opens one, up to a limit, or waits for one to come back), and the response
gives it back when its body is closed. The connections, the HTTP/1.1 state machine and the
exception mapping are httpcore's and httpx's own; only the bookkeeping differs.

It is a benchmark experiment, not part of meshlib: it speaks HTTP/1.1 only, has no pool
timeout, and is proven by nothing but this benchmark.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

import httpcore
import httpx

#: (scheme, host, port): httpcore's Origin compares equal but does not hash
_Key = tuple[bytes, bytes, int | None]


class _Stream:
    """The response body; closing it returns the connection to the pool."""

    def __init__(
        self,
        stream: AsyncIterator[bytes],
        pool: FreeListPool,
        origin: _Key,
        connection: httpcore.AsyncHTTPConnection,
    ) -> None:
        self._stream = stream
        self._pool = pool
        self._origin = origin
        self._connection = connection
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        """Close the body, then give the connection back (or drop it)."""
        if self._closed:
            return
        self._closed = True
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()
        await self._pool.release(self._origin, self._connection)


class FreeListPool:
    """HTTP/1.1 connections per origin: LIFO idle list, at most ``limit`` open per origin."""

    def __init__(self, limit: int = 100, keepalive_expiry: float = 5.0) -> None:
        self._limit = limit
        self._keepalive_expiry = keepalive_expiry
        self._idle: dict[_Key, list[httpcore.AsyncHTTPConnection]] = {}
        self._open: dict[_Key, int] = {}
        self._waiters: dict[_Key, deque[asyncio.Future[None]]] = {}

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        """Send ``request`` on a pooled connection to its origin."""
        url = request.url
        origin = (url.scheme, url.host, url.port)
        connection = self._take_idle(origin)
        while connection is None:
            if self._open.get(origin, 0) < self._limit:
                self._open[origin] = self._open.get(origin, 0) + 1
                connection = httpcore.AsyncHTTPConnection(
                    url.origin, keepalive_expiry=self._keepalive_expiry
                )
                break
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(origin, deque()).append(waiter)
            await waiter
            connection = self._take_idle(origin)
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            await self._drop(origin, connection)
            raise
        return httpcore.Response(
            status=response.status,
            headers=response.headers,
            content=_Stream(response.stream, self, origin, connection),  # type: ignore[arg-type]
            extensions=response.extensions,
        )

    def _take_idle(self, origin: _Key) -> httpcore.AsyncHTTPConnection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.is_idle() and not connection.has_expired():
                return connection
            self._open[origin] -= 1  # closed by the server, or expired: forget it
            asyncio.get_running_loop().create_task(connection.aclose())
        return None

    async def release(self, origin: _Key, connection: httpcore.AsyncHTTPConnection) -> None:
        """A response is done with ``connection``."""
        if connection.is_idle():
            self._idle.setdefault(origin, []).append(connection)
            self._wake(origin)
        else:
            await self._drop(origin, connection)

    async def _drop(self, origin: _Key, connection: httpcore.AsyncHTTPConnection) -> None:
        self._open[origin] -= 1
        self._wake(origin)
        await connection.aclose()

    def _wake(self, origin: _Key) -> None:
        waiters = self._waiters.get(origin)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def __aenter__(self) -> FreeListPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for connection in idle:
                await connection.aclose()
        self._idle.clear()


def transport(limit: int = 100) -> httpx.AsyncHTTPTransport:
    """An ``httpx.AsyncHTTPTransport`` (httpx's request and exception mapping) on this pool."""
    inner = httpx.AsyncHTTPTransport()
    inner._pool = FreeListPool(limit)  # type: ignore[assignment]
    return inner
