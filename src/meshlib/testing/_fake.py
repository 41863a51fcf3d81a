"""A named fake service: a real HTTP server on loopback, in this process, with faults.

Each fake listens on ``127.0.0.1:<free port>`` in a thread of its own, so the code under
test reaches it through meshlib exactly as it reaches a real instance: discovery, routing,
balancing, retries, deadlines and telemetry all run. Only the service's answers are
canned. Every request it receives is recorded (``attempts``); faults apply to the next
requests: a ``delay`` before answering, an ``abort`` with a status, or a ``reset`` (the
connection is closed with a TCP RST before any answer, as a crashed instance does).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Answer", "FakeService", "Received"]


@dataclass(frozen=True)
class Received:
    """One request a fake service received (one attempt of the caller)."""

    method: str
    path: str
    #: lower-case names
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Answer:
    """What a fake service answers: a status, a body (``json`` wins) and headers."""

    status: int = 200
    json: Any = None
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Received], Answer]


@dataclass
class _Fault:
    delay: float = 0.0
    abort: int | None = None
    reset: bool = False
    #: how many more requests it applies to (None: all)
    times: int | None = None


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler sleeping in a delay fault never holds up close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a reset fault or a caller that gave up: expected, not worth a traceback


class FakeService:
    """A fake instance of the service ``name``; see ``meshlib.testing.FakeMesh``."""

    def __init__(self, name: str, answer: Answer | Handler | None = None) -> None:
        self.name = name
        self._answer: Answer | Handler = answer if answer is not None else Answer()
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self.attempts: list[Received] = []
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"fake-{name}", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, where this fake listens."""
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def answer(self, answer: Answer | Handler) -> None:
        """Answer every later request with ``answer`` (or what a handler returns)."""
        self._answer = answer

    def fault(
        self,
        *,
        delay: float = 0.0,
        abort: int | None = None,
        reset: bool = False,
        times: int | None = None,
    ) -> None:
        """Make the next ``times`` requests (all, by default) slow, aborted or reset."""
        with self._lock:
            self._faults.append(_Fault(delay, abort, reset, times))

    def heal(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def _next_fault(self) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.times is None:
                    return fault
                if fault.times > 0:
                    fault.times -= 1
                    return fault
            return None

    def close(self) -> None:
        """Stop listening."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                received = Received(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length) if length else b"",
                )
                with fake._lock:
                    fake.attempts.append(received)
                fault = fake._next_fault()
                if fault is not None and fault.delay:
                    time.sleep(fault.delay)
                if fault is not None and fault.reset:
                    # SO_LINGER 0: close() sends RST, the caller sees the connection reset
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                if fault is not None and fault.abort is not None:
                    answer = Answer(fault.abort, {"error": "fault injected by meshlib.testing"})
                else:
                    canned = fake._answer
                    answer = canned if isinstance(canned, Answer) else canned(received)
                body = answer.body
                headers = dict(answer.headers)
                if answer.json is not None:
                    body = json.dumps(answer.json).encode()
                    headers.setdefault("content-type", "application/json")
                try:
                    self.send_response(answer.status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    self.close_connection = True  # the caller gave up (a timeout)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

        return _Handler
