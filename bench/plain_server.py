"""A minimal HTTP/1.1 keep-alive server on asyncio, for benchmarks and chaos scenarios.

    python bench/plain_server.py --port 8001 [--name a] [--delay-ms 100] [--mode reset-mid-body]

It answers every request with ``200`` and its name, and costs the machine as little as a
Python server can (no framework, no parsing beyond finding the end of each request), so a
benchmark of a client measures the client. ``--mode`` makes it misbehave the ways a real
backend does, which a framework server cannot be told to:

* ``ok`` (default): answer;
* ``hang``: accept and read requests, never answer;
* ``reset-before-headers``: read the request, write half a status line, reset the connection;
* ``reset-mid-body``: write the headers and part of the body, then reset the connection.

A reset is a close with ``SO_LINGER`` 0, so the peer gets RST, as when a process crashes.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct

MODES = ("ok", "hang", "reset-before-headers", "reset-mid-body")


class _Http(asyncio.Protocol):
    def __init__(self, name: bytes, delay: float, mode: str) -> None:
        self.body = name
        self.delay = delay
        self.mode = mode
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            if self.delay:
                asyncio.get_running_loop().call_later(self.delay, self.answer)
            else:
                self.answer()

    def answer(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.mode == "hang":
            return
        if self.mode == "reset-before-headers":
            transport.write(b"HTTP/1.1 2")
            self.reset()
            return
        body = self.body
        if self.mode == "reset-mid-body":
            head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(body) + 100)
            transport.write(head + body)
            self.reset()
            return
        transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )

    def reset(self) -> None:
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def _serve(host: str, port: int, name: str, delay: float, mode: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Http(name.encode(), delay, mode), host, port, backlog=1024, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="plain")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--mode", choices=MODES, default="ok")
    args = parser.parse_args()
    asyncio.run(_serve(args.host, args.port, args.name, args.delay_ms / 1000, args.mode))


if __name__ == "__main__":
    main()
