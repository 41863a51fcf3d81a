"""A minimal HTTP/1.1 keep-alive load client on asyncio, for measuring servers.

``hammer`` keeps ``concurrency`` connections busy, one request in flight on each (no
pipelining), for a fixed time, and counts the answers. Like bench/plain_server.py on the
other side, it does no parsing beyond finding the end of each response (the status line and
``content-length``), so it costs the machine as little as a Python client can: when a
server is measured with it, the server is what limits. Row 7 checks that by also running it
against bench/plain_server.py, which answers far faster than any framework server.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from dataclasses import dataclass


@dataclass
class Load:
    """What one ``hammer`` run got."""

    requests: int
    seconds: float

    @property
    def req_per_s(self) -> float:
        """Answers per second."""
        return self.requests / self.seconds


class _Connection(asyncio.Protocol):
    """One connection sending ``request`` again as soon as each answer is complete."""

    def __init__(self, request: bytes, end: float, done: asyncio.Future[None]) -> None:
        self.request = request
        self.end = end
        self.done = done
        self.buffer = b""
        self.count = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self) -> None:
        """Send the next request, or finish once the time is up."""
        assert self.transport is not None
        if time.monotonic() >= self.end:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            if not head.startswith(b"HTTP/1.1 200 "):
                status = head.split(b"\r\n", 1)[0]
                self._fail(f"answered {status!r}")
                return
            length = -1
            for line in head.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length < 0:
                self._fail("an answer without content-length")
                return
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.count += 1
            self.send()

    def _fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(why))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(f"connection lost: {exc}"))


async def hammer(host: str, port: int, path: str, concurrency: int, seconds: float) -> Load:
    """GET ``path`` on ``concurrency`` keep-alive connections for ``seconds``."""
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\n\r\n".encode()
    connections = []
    futures = []
    for _ in range(concurrency):
        done: asyncio.Future[None] = loop.create_future()
        _, connection = await loop.create_connection(
            functools.partial(_Connection, request, 0.0, done), host, port
        )
        connections.append(connection)
        futures.append(done)
    started = time.monotonic()
    try:
        for connection in connections:
            connection.end = started + seconds
            connection.send()
        await asyncio.gather(*futures)
        took = time.monotonic() - started
    finally:
        for connection in connections:
            if connection.transport is not None:
                connection.transport.close()
    return Load(sum(c.count for c in connections), took)
