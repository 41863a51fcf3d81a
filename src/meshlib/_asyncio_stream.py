"""httpcore's network streams on asyncio's own transports, for the async pool.

Why not httpcore's default backend on asyncio (anyio's socket streams): every ``read`` and
``write`` there enters ``anyio.fail_after`` (a cancel scope and a timer), a
``map_exceptions`` context manager, and anyio's checkpoint, which yields to the event loop
once more after each send; and asking an idle connection whether the server closed it
(``is_readable``) is a ``select`` call. At 32 requests in flight those were about a fifth of
the async client's CPU (py-spy, docs/performance.md, row 2). Here a connection is an
``asyncio.Protocol``:

* ``read`` returns what already arrived without suspending, and otherwise waits on one
  future, with a timer only while it waits;
* ``write`` hands the bytes to the transport (which sends what it can at once) and waits only
  while the transport says its buffer is full (``pause_writing``);
* ``is_readable`` is what the protocol already saw: bytes, the end of the stream, or the
  connection lost; no system call. (The event loop reports those as they happen; a close the
  loop has not yet seen is the race the pool's stale-connection retry covers.)

Errors are httpcore's, as its own backends raise them: ``ConnectError``/``ConnectTimeout``
for the connection and the TLS handshake, ``ReadError``/``ReadTimeout``, ``WriteError``/
``WriteTimeout``; the server's end of stream reads as ``b""``, which httpcore turns into
"server disconnected". TLS is the loop's ``start_tls`` (on uvloop, its C TLS).

Only for asyncio: under another async library (trio) the pool keeps httpcore's default.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Iterable
from typing import Any, NoReturn, cast

import httpcore

__all__ = ["AsyncioBackend"]

#: Reading stops while this much arrived and was not read yet (a slow consumer of a large
#: streamed body), and starts again below half of it.
_HIGH_WATER = 256 * 1024


class _Protocol(asyncio.Protocol):
    """What arrives on one connection, and whether the transport can take more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.eof = False
        self.lost = False
        self.error: BaseException | None = None
        self.reading_paused = False
        self.writing_paused = False
        #: a read waiting for data, or a write waiting for room
        self.read_waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods but not its class
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > _HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        _wake(self.read_waiter)

    def eof_received(self) -> bool:
        self.eof = True
        _wake(self.read_waiter)
        return False  # the transport closes itself: HTTP/1.1 has no half-closed exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        _wake(self.read_waiter)
        _wake(self.drain_waiter)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        _wake(self.drain_waiter)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


async def _wait(
    protocol: _Protocol, attribute: str, timeout: float | None, on_timeout: type[Exception]
) -> None:
    """Wait on a new future stored in ``protocol.<attribute>`` until woken or ``timeout``."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    setattr(protocol, attribute, waiter)
    timer = None
    if timeout is not None:
        timer = loop.call_later(timeout, _expire, waiter)
    try:
        await waiter
    except TimeoutError:
        raise on_timeout(f"timed out after {timeout} s") from None
    finally:
        setattr(protocol, attribute, None)
        if timer is not None:
            timer.cancel()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection (plain or TLS) as httpcore's ``AsyncNetworkStream``."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Up to ``max_bytes`` that arrived; ``b""`` once the server ended the stream."""
        protocol = self._protocol
        if not protocol.chunks:
            if protocol.lost or protocol.eof:
                return self._at_end()
            await _wait(protocol, "read_waiter", timeout, httpcore.ReadTimeout)
            if not protocol.chunks:
                return self._at_end()
        chunks = protocol.chunks
        data = chunks.popleft()
        if chunks and len(data) < max_bytes:
            # Everything that arrived, up to max_bytes: over TLS a response's head and body
            # are two records, each its own data_received; one read saves httpcore and h11 a
            # round (a read, a parse that needs more, another read).
            parts = [data]
            size = len(data)
            while chunks and size + len(chunks[0]) <= max_bytes:
                part = chunks.popleft()
                parts.append(part)
                size += len(part)
            data = b"".join(parts)
        if len(data) > max_bytes:
            chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        protocol.buffered -= len(data)
        if protocol.reading_paused and protocol.buffered <= _HIGH_WATER // 2:
            protocol.reading_paused = False
            self._transport.resume_reading()
        return data

    def _at_end(self) -> bytes:
        error = self._protocol.error
        if error is not None:
            raise httpcore.ReadError(str(error) or type(error).__name__) from error
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Send ``buffer``, waiting only while the transport's buffer is full."""
        if not buffer:
            return
        protocol = self._protocol
        if protocol.lost or self._transport.is_closing():
            self._write_failed()
        self._transport.write(buffer)
        while protocol.writing_paused:
            await _wait(protocol, "drain_waiter", timeout, httpcore.WriteTimeout)
            if protocol.lost:
                self._write_failed()

    def _write_failed(self) -> NoReturn:
        error = self._protocol.error
        raise httpcore.WriteError(
            "the connection is closed" if error is None else str(error)
        ) from error

    async def aclose(self) -> None:
        """Close the connection; what was written still goes out first."""
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """This connection with TLS on top, handshake done."""
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self._transport,
                self._protocol,
                ssl_context,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
        except TimeoutError as exc:
            self._transport.abort()
            raise httpcore.ConnectTimeout(f"TLS handshake timed out after {timeout} s") from exc
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self._transport.abort()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        except BaseException:
            self._transport.abort()
            raise
        if transport is None:  # the peer closed the connection during the handshake
            raise httpcore.ConnectError("the server closed the connection during the handshake")
        self._protocol.transport = transport
        return AsyncioStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        """``ssl_object``, ``client_addr``, ``server_addr``, ``socket``, ``is_readable``."""
        if info == "is_readable":
            protocol = self._protocol
            return bool(protocol.chunks) or protocol.eof or protocol.lost
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on asyncio's transports (see the module's docstring)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """A TCP connection to ``host:port`` (``TCP_NODELAY``, as asyncio sets it)."""
        loop = asyncio.get_running_loop()
        protocol = _Protocol()
        local = None if local_address is None else (local_address, 0)
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(
                    lambda: protocol, host, port, local_addr=local
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(
                f"no connection to {host}:{port} within {timeout} s"
            ) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = transport.get_extra_info("socket")
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
        except OSError as exc:
            transport.abort()
            raise httpcore.ConnectError(str(exc)) from exc
        return AsyncioStream(transport, protocol)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """A connection to the Unix socket at ``path``."""
        loop = asyncio.get_running_loop()
        protocol = _Protocol()
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_unix_connection(lambda: protocol, path)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"no connection to {path} within {timeout} s") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(seconds)
