"""The async inner transport: httpcore's HTTP/1.1 connections in a last-in-first-out pool.

Why not ``httpx.AsyncHTTPTransport``: its pool (httpcore 1.0's ``AsyncConnectionPool``)
re-examines every queued request against every connection, and asks each idle connection's
socket whether it is readable, each time a request starts or ends. Its cost per request
grows with the requests in flight: with 32 in flight against one keep-alive server, bare
``httpx.AsyncClient`` did 778 req/s where a bare aiohttp session did 9,940, and the same
httpcore connections under a free list did 3.19x httpx's figure (docs/performance.md, row 2;
FINDINGS.md). ``httpx-aiohttp``'s transport was faster still, but aiohttp's connector gives
no public place to check the server's SPIFFE ID after the handshake and before the request
is written, which httpcore's ``trace`` extension does (security/_verify.py).

So the connections, their HTTP/1.1 state machine, SNI (``sni_hostname``), the ``trace`` and
``timeout`` extensions are httpcore's own; only the bookkeeping is this module's:

* per origin, a LIFO list of idle connections (the most recently used is the warmest, and
  the others expire by themselves); taking one checks only that one (``has_expired`` also
  notices a server that closed it meanwhile);
* at most ``max_connections`` open in all; a request beyond that waits, first come first
  served, up to the ``pool`` timeout, then raises ``httpx.PoolTimeout``;
* a response gives its connection back when its body is closed: to the idle list if the
  exchange finished cleanly (at most ``max_keepalive_connections`` are kept), else closed;
* a request cancelled or failed before its response, or a body closed before its end, closes
  its connection (under cancellation shielding, so a cancelled task leaks nothing);
* a request that fails on a *reused* connection before any byte of a response came back
  (the server closed an idle keep-alive connection as we wrote to it) is sent once more on a
  new connection when its method is idempotent and its body can be sent again, as Go's
  net/http does: a stale connection never fails such a request. Nothing else is retried
  here; retries across instances are the pipeline's.

HTTP/1.1 only, as the mesh speaks it between services.
"""

from __future__ import annotations

import ssl
import sys
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import nullcontext
from typing import Any

import anyio
import httpcore
import httpx
import sniffio

from ._asyncio_stream import AsyncioBackend
from ._core import AsyncCheckedBackend, Handshake, core_request, raise_mapped

__all__ = ["AsyncPoolTransport"]

#: a request sent once more after a stale keep-alive connection failed it
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

_Origin = tuple[bytes, bytes, int | None]
_ASYNCIO = AsyncioBackend()


#: what a reused connection fails with when the server had closed it (stale keep-alive)
_STALE = (httpcore.NetworkError, httpcore.RemoteProtocolError)


class AsyncPoolTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` over a free-list pool of httpcore connections.

    Args:
        verify: the ``ssl.SSLContext`` for ``https`` origins (default: httpx's, made on the
            first ``https`` request, since loading the CA bundle costs ~30 ms).
        limits: ``max_connections``, ``max_keepalive_connections`` and ``keepalive_expiry``,
            as ``httpx.AsyncHTTPTransport`` takes them.
        handshake: run on each new TLS connection after its handshake, before a byte of a
            request is written on it (the mesh checks the server's identity there:
            ``_core.AsyncCheckedBackend``).
    """

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | None = None,
        limits: httpx.Limits = httpx.Limits(),  # noqa: B008 - immutable
        handshake: Handshake | None = None,
    ) -> None:
        self._ssl = verify
        self._handshake = handshake
        unlimited = sys.maxsize
        self._max = unlimited if limits.max_connections is None else limits.max_connections
        self._max_idle = (
            unlimited
            if limits.max_keepalive_connections is None
            else limits.max_keepalive_connections
        )
        self._expiry = limits.keepalive_expiry
        self._idle: dict[_Origin, list[httpcore.AsyncHTTPConnection]] = {}
        self._idle_count = 0
        self._open = 0
        self._waiters: deque[anyio.Event] = deque()
        self._closed = False

    @property
    def connections(self) -> int:
        """Connections open now (idle or carrying a request)."""
        return self._open

    @property
    def idle(self) -> int:
        """Idle connections kept for reuse."""
        return self._idle_count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on a pooled connection to its origin."""
        url = request.url
        origin: _Origin = (url.raw_scheme, url.raw_host, url.port)
        core = core_request(request)
        timeouts: dict[str, Any] = request.extensions.get("timeout") or {}
        replayable = request.method in _IDEMPOTENT and isinstance(request.stream, httpx.ByteStream)
        while True:
            connection, reused = await self._acquire(origin, timeouts.get("pool"))
            try:
                response = await connection.handle_async_request(core)
            except BaseException as exc:
                await self._discard(connection)
                if reused and replayable and isinstance(exc, _STALE):
                    continue  # a stale keep-alive connection: once more on another
                if isinstance(exc, Exception):
                    raise_mapped(exc)
                raise
            assert isinstance(response.stream, AsyncIterable)
            return httpx.Response(
                status_code=response.status,
                headers=response.headers,
                stream=_Body(response.stream, self, origin, connection),
                extensions=response.extensions,
            )

    async def _acquire(
        self, origin: _Origin, timeout: float | None
    ) -> tuple[httpcore.AsyncHTTPConnection, bool]:
        """An idle connection (reused=True) or a new one, waiting for room up to ``timeout``."""
        got = await self._take_or_open(origin)
        if got is not None:  # the usual case: no wait, so no timer and no cancel scope
            return got
        try:
            with anyio.fail_after(timeout) if timeout is not None else nullcontext():
                while True:
                    await self._wait_turn()
                    got = await self._take_or_open(origin)
                    if got is not None:
                        return got
        except TimeoutError:
            raise httpx.PoolTimeout(
                f"no connection free within the pool timeout ({self._max} open at most)"
            ) from None

    async def _take_or_open(
        self, origin: _Origin
    ) -> tuple[httpcore.AsyncHTTPConnection, bool] | None:
        """An idle connection, or a new one if there is room; None if it must wait."""
        while True:
            if self._closed:
                raise httpx.TransportError("the transport is closed")
            connection = await self._take_idle(origin)
            if connection is not None:
                return connection, True
            if self._open < self._max:
                self._open += 1
                return self._new(origin), False
            if not await self._evict_idle():
                return None
            # room made by closing another origin's idle connection: look again

    async def _wait_turn(self) -> None:
        """Wait until a connection closes or goes idle (first come, first served)."""
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event in self._waiters:
                self._waiters.remove(event)
            elif event.is_set():
                self._wake()  # woken, but leaving: pass the turn on
            raise

    def _new(self, origin: _Origin) -> httpcore.AsyncHTTPConnection:
        scheme, host, port = origin
        ssl_context = None
        if scheme == b"https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            ssl_context = self._ssl
        # asyncio's own transports (_asyncio_stream.py); httpcore's default elsewhere
        backend: httpcore.AsyncNetworkBackend | None = (
            _ASYNCIO if sniffio.current_async_library() == "asyncio" else None
        )
        if self._handshake is not None:
            backend = AsyncCheckedBackend(backend or httpcore.AnyIOBackend(), self._handshake)
        return httpcore.AsyncHTTPConnection(
            httpcore.Origin(scheme, host, port or (443 if scheme == b"https" else 80)),
            ssl_context=ssl_context,
            keepalive_expiry=self._expiry,
            network_backend=backend,
        )

    async def _take_idle(self, origin: _Origin) -> httpcore.AsyncHTTPConnection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            if connection.is_idle() and not connection.has_expired():
                return connection
            await self._discard(connection)  # expired, or closed by the server meanwhile
        return None

    async def _evict_idle(self) -> bool:
        """Close the oldest idle connection of any origin; False if there is none."""
        for idle in self._idle.values():
            if idle:
                self._idle_count -= 1
                await self._discard(idle.pop(0))
                return True
        return False

    async def _discard(self, connection: httpcore.AsyncHTTPConnection) -> None:
        """Close a connection that will carry nothing more, and free its place."""
        self._open -= 1
        self._wake()
        with anyio.CancelScope(shield=True):
            await connection.aclose()

    def _release(self, origin: _Origin, connection: httpcore.AsyncHTTPConnection) -> bool:
        """Take back a connection whose exchange ended; False if it must be closed."""
        if self._closed or not connection.is_idle() or self._idle_count >= self._max_idle:
            return False
        self._idle.setdefault(origin, []).append(connection)
        self._idle_count += 1
        self._wake()
        return True

    def _wake(self) -> None:
        while self._waiters:
            event = self._waiters.popleft()
            if not event.is_set():
                event.set()
                return

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their responses do."""
        self._closed = True
        idle = [connection for connections in self._idle.values() for connection in connections]
        self._idle.clear()
        self._idle_count = 0
        for connection in idle:
            self._open -= 1
            with anyio.CancelScope(shield=True):
                await connection.aclose()
        while self._waiters:
            self._waiters.popleft().set()


class _Body(httpx.AsyncByteStream):
    """A response body; closing it gives the connection back to the pool (or closes it)."""

    def __init__(
        self,
        stream: AsyncIterable[bytes],
        pool: AsyncPoolTransport,
        origin: _Origin,
        connection: httpcore.AsyncHTTPConnection,
    ) -> None:
        self._stream = stream
        self._pool = pool
        self._origin = origin
        self._connection: httpcore.AsyncHTTPConnection | None = connection

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except Exception as exc:
            raise_mapped(exc)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        with anyio.CancelScope(shield=True):
            aclose = getattr(self._stream, "aclose", None)
            try:
                if aclose is not None:
                    await aclose()  # httpcore: ends the exchange (idle, or closed if cut short)
            except Exception:
                await self._pool._discard(connection)
                raise
            if not self._pool._release(self._origin, connection):
                await self._pool._discard(connection)
