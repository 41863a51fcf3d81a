"""What a strict server says to a plaintext caller, and how refusals are logged.

A plaintext HTTP request at a ``MESH_TLS=strict`` port gets one fixed answer before the
connection closes -- ``400`` with ``x-mesh-tls-required: strict`` and a body that says what
to do -- as nginx answers "The plain HTTP request was sent to HTTPS port". A bare close
left the caller with "Server disconnected without sending a response" and nothing to go
on; meshlib's client turns the header into a ``MeshRequestError`` naming the fix, and curl
or a plain httpx client shows the body.

Refusals are expected events (a port scanner, a TCP health check, a misconfigured
caller): ``RefusalLog`` logs the first of each reason with its peer, then at most one line
per interval saying how many more there were, never a traceback.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Final

__all__ = ["PLAINTEXT_REFUSAL", "TLS_REQUIRED_HEADER", "RefusalLog", "tls_required_message"]

#: Set on the answer a strict server gives a plaintext request.
TLS_REQUIRED_HEADER: Final = "x-mesh-tls-required"

_BODY: Final = (
    b"this port requires mutual TLS (MESH_TLS=strict): call it through meshlib with "
    b"MESH_TLS=strict or permissive and the mesh's certificates (MESH_TLS_DIR or Consul's CA)\n"
)
#: The whole answer, written raw before the connection closes.
PLAINTEXT_REFUSAL: Final = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    + TLS_REQUIRED_HEADER.encode()
    + b": strict\r\nconnection: close\r\ncontent-length: "
    + str(len(_BODY)).encode()
    + b"\r\n\r\n"
    + _BODY
)


def tls_required_message(service: str, address: str) -> str:
    """The client's error when ``service`` at ``address`` refused its plaintext request."""
    return (
        f"service {service!r} at {address} requires mTLS (it runs with MESH_TLS=strict) and "
        "this client sent plaintext: run the caller with MESH_TLS=strict (or permissive), "
        "MESH_SERVICE_NAME set, and the mesh's CA (MESH_TLS_DIR, or Consul's Connect CA)"
    )


class RefusalLog:
    """One warning per reason, then at most one per ``interval`` seconds with a count."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval
        self._lock = threading.Lock()
        #: reason -> (when it was last logged, refusals not logged since)
        self._seen: dict[str, tuple[float, int]] = {}

    def refused(self, reason: str, peer: object) -> None:
        """A connection from ``peer`` was refused for ``reason`` (a fixed phrase)."""
        now = time.monotonic()
        with self._lock:
            last, quiet = self._seen.get(reason, (-self._interval, 0))
            if now - last < self._interval:
                self._seen[reason] = (last, quiet + 1)
                return
            self._seen[reason] = (now, 0)
        more = f" ({quiet} more since the last such line)" if quiet else ""
        self._logger.warning("refused a connection from %s: %s%s", peer, reason, more)
