"""The guarded h11 protocol's header clock (server/_http_guard.py), on a real uvicorn server.

In process, so the header timeout can be 1 s instead of 10; the end-to-end checks of the
guard (malformed requests, slow drips under `meshlib serve`) are in test_bad_input.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn

from meshlib.server import _http_guard
from meshlib.server._http_guard import GuardedH11Protocol
from polling import wait_until
from served import LOOPS

TIMEOUT = 1.0
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def _guarded_server(loop: str) -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(
        _app, http=GuardedH11Protocol, loop=loop, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=20, what="uvicorn started")
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


def _answered(sock: socket.socket) -> bytes:
    answer = b""
    while not answer.endswith(b"\r\n\r\nok"):
        chunk = sock.recv(4096)
        assert chunk, f"closed after {answer!r}"
        answer += chunk
    return answer


@pytest.fixture(autouse=True)
def _short_header_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_http_guard, "HEADER_TIMEOUT", TIMEOUT)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_header_block_after_a_served_request_gets_its_own_full_timeout(loop: str) -> None:
    # The connection's timer was armed by the first request's block, 0.6 s before the second
    # block starts: it must not cut the second one off 0.4 s in.
    with _guarded_server(loop) as port, socket.create_connection(("127.0.0.1", port), 10) as sock:
        sock.sendall(REQUEST)
        assert _answered(sock).startswith(b"HTTP/1.1 200")
        time.sleep(0.6)  # deliberate: the second block starts mid-way through the timer's period
        sent = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert sock.recv(1) == b""  # closed by the server (a socket timeout: never closed)
        took = time.monotonic() - sent
    assert TIMEOUT - 0.1 < took < TIMEOUT + 2


@pytest.mark.parametrize("loop", LOOPS)
def test_a_kept_alive_connection_with_complete_requests_outlives_the_timer(loop: str) -> None:
    with _guarded_server(loop) as port, socket.create_connection(("127.0.0.1", port), 10) as sock:
        ended = time.monotonic() + 2.5 * TIMEOUT  # the timer fires twice or more meanwhile
        answered = 0
        while time.monotonic() < ended:
            sock.sendall(REQUEST)
            assert _answered(sock).startswith(b"HTTP/1.1 200")
            answered += 1
            time.sleep(0.1)  # deliberate: a caller's pace, between header blocks
        assert answered >= 10
