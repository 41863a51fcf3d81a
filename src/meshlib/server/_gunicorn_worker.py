"""gunicorn's gthread worker with a deadline on reading a request's header block.

A gthread worker reads each request's headers in one of its threads, blocking. A client
that sends its header block a byte at a time (a slow drip) held that thread for as long as
it kept dripping -- measured: ten such clients against eight threads left every other caller
without an answer. Here a request's header block, TLS handshake included, must be read
within ``HEADER_TIMEOUT`` (the same bound as uvicorn's, _http_guard.py) of the moment a
thread takes the connection; the worker's main loop, which wakes at least once a second,
shuts down the socket of a connection past its deadline, so the blocked read returns and
the thread is free again. The clock starts when a thread takes the connection, not when it
is queued: a legitimate request waiting for a free thread is never cut off. So while more
drips than threads arrive at once, other callers still wait, for at most that bound, and
the drips are cut within the bound times the number of drips per thread (measured: ten
drips, eight threads, 10 s bound: cut after 10.2-20.9 s, others waited at most 10.2 s).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from ._http_guard import HEADER_TIMEOUT

__all__ = ["GuardedThreadWorker"]


class GuardedThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gthread, closing connections whose header block takes over ``HEADER_TIMEOUT``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading: dict[Any, float] = {}
        self._reading_lock = threading.Lock()

    def handle(self, conn: Any) -> Any:
        """Read and serve one request, under the header deadline until it is parsed."""
        with self._reading_lock:
            self._reading[conn] = time.monotonic() + HEADER_TIMEOUT
        try:
            return super().handle(conn)
        finally:
            with self._reading_lock:
                self._reading.pop(conn, None)

    def handle_request(self, req: Any, conn: Any) -> Any:
        """The header block is in: no deadline for the app's own work."""
        with self._reading_lock:
            self._reading.pop(conn, None)
        return super().handle_request(req, conn)

    def murder_keepalived(self, force: bool = False) -> None:
        """As gthread, and cut off connections past their header deadline."""
        super().murder_keepalived(force)
        now = time.monotonic()
        with self._reading_lock:
            late = [conn for conn, deadline in self._reading.items() if deadline < now]
            for conn in late:
                del self._reading[conn]
        for conn in late:
            with contextlib.suppress(OSError):  # already gone
                conn.sock.shutdown(socket.SHUT_RDWR)
