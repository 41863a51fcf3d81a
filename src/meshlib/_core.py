"""httpcore under httpx, as the mesh's own transports use it: requests, errors, handshakes.

* ``core_request`` and ``mapped``: an ``httpx.Request`` as httpcore's, and httpcore's errors
  as httpx's (the table httpx maps with), for transports that drive httpcore's connections
  themselves (the async pool, ``_async_pool.py``; the mesh-TLS pools, ``CorePoolTransport``).
* ``CheckedBackend`` / ``AsyncCheckedBackend``: a network backend that hands each new TLS
  connection to a check right after its handshake, before httpcore writes a byte on it. The
  mesh's pools check the server's identity there (security/_verify.py) once per connection.
  httpcore's ``trace`` extension, which did it before, is called about ten times a request
  on every request, connection new or not: 25 µs a request on the sync strict-mTLS path
  (docs/performance.md, row 3). Only the connection's first step is wrapped: the stream the
  handshake returns is the inner backend's own, so reads and writes pay nothing.
* ``CorePoolTransport``: ``httpx.HTTPTransport``'s job over an ``httpcore.ConnectionPool``
  made here, since ``httpx.HTTPTransport`` takes no network backend.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

import httpcore
import httpx

__all__ = [
    "AsyncCheckedBackend",
    "CheckedBackend",
    "CorePoolTransport",
    "Handshake",
    "core_request",
    "mapped",
    "raise_mapped",
]

#: called with each new TLS stream after its handshake; raises to refuse the connection
Handshake = Callable[[Any], None]

#: httpcore's errors -> httpx's (the most specific wins; the table httpx maps with)
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


def mapped(exc: Exception) -> Exception:
    """The httpx error for an httpcore one (``exc`` itself if it is no httpcore error)."""
    for source, target in _ERRORS:
        if isinstance(exc, source):
            return target(str(exc))
    return exc


def raise_mapped(exc: Exception) -> NoReturn:
    """Raise ``exc`` as httpx's error (chained to it), or as itself if it is no httpcore one."""
    error = mapped(exc)
    if error is exc:
        raise exc
    raise error from exc


def core_request(request: httpx.Request) -> httpcore.Request:
    """``request`` as httpcore's (its stream and extensions shared, not copied)."""
    url = request.url
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
        ),
        headers=request.headers.raw,
        content=request.stream,
        extensions=request.extensions,
    )


class _CheckedStream(httpcore.NetworkStream):
    """A new connection until its handshake: then the inner TLS stream, checked."""

    def __init__(self, inner: httpcore.NetworkStream, check: Handshake) -> None:
        self._inner = inner
        self._check = check

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.start_tls(ssl_context, server_hostname, timeout)
        try:
            self._check(stream)
        except BaseException:
            stream.close()
            raise
        return stream

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class CheckedBackend(httpcore.NetworkBackend):
    """``inner`` with ``check`` run on each TLS connection after its handshake."""

    def __init__(self, inner: httpcore.NetworkBackend, check: Handshake) -> None:
        self._inner = inner
        self._check = check

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        """The inner backend's connection, its handshake checked."""
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _CheckedStream(stream, self._check)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        """The inner backend's connection, its handshake checked."""
        stream = self._inner.connect_unix_socket(path, timeout, socket_options)
        return _CheckedStream(stream, self._check)

    def sleep(self, seconds: float) -> None:
        """The inner backend's."""
        self._inner.sleep(seconds)


class _AsyncCheckedStream(httpcore.AsyncNetworkStream):
    """The async twin of ``_CheckedStream``."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, check: Handshake) -> None:
        self._inner = inner
        self._check = check

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        try:
            self._check(stream)
        except BaseException:
            await stream.aclose()
            raise
        return stream

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class AsyncCheckedBackend(httpcore.AsyncNetworkBackend):
    """The async twin of ``CheckedBackend``."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend, check: Handshake) -> None:
        self._inner = inner
        self._check = check

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """The inner backend's connection, its handshake checked."""
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _AsyncCheckedStream(stream, self._check)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        """The inner backend's connection, its handshake checked."""
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return _AsyncCheckedStream(stream, self._check)

    async def sleep(self, seconds: float) -> None:
        """The inner backend's."""
        await self._inner.sleep(seconds)


class CorePoolTransport(httpx.BaseTransport):
    """An ``httpx.BaseTransport`` over ``httpcore.ConnectionPool`` (HTTP/1.1).

    Args:
        verify: the ``ssl.SSLContext`` for ``https`` origins.
        limits: as ``httpx.HTTPTransport`` takes them.
        handshake: run on each new TLS connection after its handshake (``CheckedBackend``).
    """

    def __init__(
        self,
        *,
        verify: ssl.SSLContext,
        limits: httpx.Limits = httpx.Limits(),  # noqa: B008 - immutable
        handshake: Handshake | None = None,
    ) -> None:
        backend: httpcore.NetworkBackend = httpcore.SyncBackend()
        if handshake is not None:
            backend = CheckedBackend(backend, handshake)
        self._pool = httpcore.ConnectionPool(
            ssl_context=verify,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on a pooled connection."""
        try:
            response = self._pool.handle_request(core_request(request))
        except Exception as exc:
            raise_mapped(exc)
        assert isinstance(response.stream, Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        """Close the pool's connections."""
        self._pool.close()


class _Body(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except Exception as exc:
            raise_mapped(exc)

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()
