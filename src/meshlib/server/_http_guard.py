"""uvicorn's HTTP/1.1 protocol with the limits h11 leaves to the server.

``meshlib serve`` runs ASGI apps on this protocol (h11, never httptools, so one parser with
known behaviour decides what reaches the app). h11 refuses most malformed input itself;
measured against raw sockets (tests/test_bad_input.py), it let through:

1. a request with both ``Content-Length`` and ``Transfer-Encoding``, keeping the connection
   open, so bytes after the chunked body ran as a second, smuggled request. RFC 9112 §6.1
   lets a server refuse such a request; here it is refused (400) and the connection closed;
2. any ``HTTP/x.y`` version (``HTTP/7.9`` reached the handler): only 1.0 and 1.1 pass;
3. a header block of any size when it arrives in one read (asyncio reads 256 KiB at a
   time; h11's 16 KiB bound holds only for a block that arrives in pieces): at most
   ``MAX_HEADERS`` fields and ``MAX_HEADER_BYTES`` bytes, like gunicorn's defaults;
4. a header block that never ends (a slow-drip client keeps a connection, and its buffer,
   forever): the block must be complete within ``HEADER_TIMEOUT`` seconds of its first
   byte, or the connection is closed.

A refused request gets uvicorn's own 400 answer and a closed connection; the app never sees it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "HEADER_TIMEOUT",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "GuardedH11Protocol",
    "check_request",
]

logger = logging.getLogger("meshlib.server")

HEADER_TIMEOUT = 10.0
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024
_VERSIONS = (b"1.0", b"1.1")
#: the headers that frame a body, by lower-cased name, and their names' lengths
_FRAMING = {b"content-length": 1, b"transfer-encoding": 2}
_FRAMING_LENGTHS = frozenset(len(name) for name in _FRAMING)


def check_request(event: h11.Request) -> None:
    """Raise ``h11.RemoteProtocolError`` for a request h11 parsed but the mesh refuses."""
    if event.http_version not in _VERSIONS:
        raise h11.RemoteProtocolError("unsupported HTTP version", 400)
    # raw_items: one list, where iterating h11's Headers goes through Sequence's __getitem__
    items = event.headers.raw_items()
    size = len(event.target) + 4 * len(items)
    framing = 0
    for name, value in items:
        size += len(name) + len(value)
        if len(name) in _FRAMING_LENGTHS:
            framing |= _FRAMING.get(name.lower(), 0)
    if framing == 3:
        raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding", 400)
    if len(items) > MAX_HEADERS:
        raise h11.RemoteProtocolError("too many header fields", 400)
    if size > MAX_HEADER_BYTES:
        raise h11.RemoteProtocolError("header block too large", 400)


class GuardedConnection(h11.Connection):
    """An h11 server connection that also applies ``check_request``."""

    def next_event(self) -> Any:
        """h11's next event, refusing requests ``check_request`` refuses."""
        event = super().next_event()
        if type(event) is h11.Request:  # h11 makes them; isinstance would ask Event's ABC
            check_request(event)
        return event


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with ``GuardedConnection`` and a header-block timeout.

    The header clock is a time stamp per request and one timer per connection, not a timer
    per request: on uvloop a timer is a libuv handle, made, started, stopped and closed each
    time. The timer fires at most every ``HEADER_TIMEOUT`` while requests come in; when it
    does, it closes the connection if the header block in progress began ``HEADER_TIMEOUT``
    ago, waits for the rest if it began later, and goes away if none is in progress.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = GuardedConnection(h11.SERVER, self.conn._max_incomplete_event_size)
        #: loop time of the first byte of the header block being received (None: none is)
        self._header_started: float | None = None
        self._header_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        """Start the header clock at a request's first byte; stop it once it is parsed."""
        if self._header_started is None and self.conn.their_state is h11.IDLE:
            self._start_header_clock()
        super().data_received(data)
        if self._header_started is not None and self.conn.their_state is not h11.IDLE:
            self._header_started = None  # parsed: the timer, if it fires, finds none

    def on_response_complete(self) -> None:
        """As uvicorn; a pipelined request already buffered starts its own clock."""
        super().on_response_complete()
        if self.conn.their_state is not h11.IDLE:
            self._header_started = None
        elif (
            self._header_started is None
            and self.conn.trailing_data[0]
            and not self.transport.is_closing()
        ):
            self._start_header_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        """As uvicorn, and stop the clock."""
        self._header_started = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _start_header_clock(self) -> None:
        now = self.loop.time()
        self._header_started = now
        if self._header_timer is None:
            self._header_timer = self.loop.call_at(now + HEADER_TIMEOUT, self._header_check)

    def _header_check(self) -> None:
        self._header_timer = None
        started = self._header_started
        if started is None or self.conn.their_state is not h11.IDLE:
            return  # no header block in progress: the next one arms the timer again
        due = started + HEADER_TIMEOUT
        if self.loop.time() < due:  # a later block than the one the timer was armed for
            self._header_timer = self.loop.call_at(due, self._header_check)
            return
        if not self.transport.is_closing():
            logger.debug("closed a connection whose request headers took over %gs", HEADER_TIMEOUT)
            self.transport.close()
