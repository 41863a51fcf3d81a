"""What a strict server says to a plaintext caller, and how refusals are logged.

A plaintext HTTP request at a ``MESH_TLS=strict`` port gets one fixed answer before the
connection closes -- ``400`` with ``x-mesh-tls-required: strict`` and a body that says what
to do -- as nginx answers "The plain HTTP request was sent to HTTPS port". A bare close
left the caller with "Server disconnected without sending a response" and nothing to go
on; meshlib's client turns the header into a ``MeshRequestError`` naming the fix, and curl
or a plain httpx client shows the body.

A TLS handshake that fails is named for what the operator has to fix (``handshake_refusal``):
a client certificate from another CA, no client certificate, or a caller that does not trust
this server's certificate. Python's own words for these (``CERTIFICATE_VERIFY_FAILED``,
``PEER_DID_NOT_RETURN_A_CERTIFICATE``, ``TLSV1_ALERT_UNKNOWN_CA``) follow in brackets:
``refused a connection from 10.0.0.7:51234: its certificate is not from this server's CA
(OpenSSL: unable to get local issuer certificate)``.

Refusals are expected events (a port scanner, a TCP health check, a misconfigured
caller): ``RefusalLog`` logs the first of each reason and peer host, then at most one line
per interval saying how many more there were, never a traceback.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Final

__all__ = [
    "PLAINTEXT_REFUSAL",
    "TLS_REQUIRED_HEADER",
    "RefusalLog",
    "handshake_refusal",
    "tls_required_message",
]

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


#: OpenSSL's reason for a failed server-side handshake -> what it means for the operator
_HANDSHAKE_REASONS: Final = {
    "CERTIFICATE_VERIFY_FAILED": "its certificate is not from this server's CA",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "it sent no client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust this server's certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it rejected this server's certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it rejected this server's certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "it rejected this server's certificate",
    "WRONG_VERSION_NUMBER": "not TLS after a TLS record byte",
    "HTTP_REQUEST": "plaintext HTTP at a TLS port",
}
_LOG_PEERS: Final = 1024  # distinct (reason, host) pairs remembered before they are pooled


def handshake_refusal(exc: BaseException) -> str | None:
    """Why a server-side TLS handshake failed, in the operator's terms; ``None`` when the
    caller merely went away (a reset or end of file mid-handshake is not news)."""
    if not isinstance(exc, ssl.SSLError) or isinstance(exc, ssl.SSLEOFError):
        return None
    reason = getattr(exc, "reason", None) or ""
    phrase = _HANDSHAKE_REASONS.get(reason, "the TLS handshake failed")
    detail = getattr(exc, "verify_message", None) or reason.lower().replace("_", " ")
    return f"{phrase} (OpenSSL: {detail})" if detail else phrase


class RefusalLog:
    """One warning per reason and peer host, then at most one per ``interval`` seconds with
    a count; past ``_LOG_PEERS`` hosts at once, one per reason for any further hosts."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval
        self._lock = threading.Lock()
        #: (reason, peer host) -> (when it was last logged, refusals not logged since)
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def refused(self, reason: str, peer: object) -> None:
        """A connection from ``peer`` (a socket address) was refused for ``reason``."""
        host = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        now = time.monotonic()
        with self._lock:
            key = (reason, host)
            if key not in self._seen and len(self._seen) >= _LOG_PEERS:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._interval}
                if len(self._seen) >= _LOG_PEERS:
                    key = (reason, "*")  # a flood from many hosts: one line per reason
            last, quiet = self._seen.get(key, (-self._interval, 0))
            if now - last < self._interval:
                self._seen[key] = (last, quiet + 1)
                return
            self._seen[key] = (now, 0)
        more = f" ({quiet} more since the last such line)" if quiet else ""
        self._logger.warning("refused a connection from %s: %s%s", _address(peer), reason, more)


def _address(peer: object) -> str:
    """``host:port`` (``[host]:port`` for IPv6) of a socket address; anything else as is."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
        return f"{host}:{peer[1]}"
    return str(peer)
