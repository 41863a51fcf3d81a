"""Mesh TLS for uvicorn: one port for mTLS (and, when permissive, plaintext), and the
caller's verified identity in the ASGI scope.

uvicorn runs without its own TLS; this HTTP protocol class looks at the first byte of each
connection without reading it (``MSG_PEEK``). A TLS ClientHello (0x16) is handed to the
event loop's own TLS with the mesh's base server context (its ``sni_callback`` points the
handshake at the newest rotated context), and the HTTP protocol starts once the handshake
has verified the client. Anything else is plaintext: served in ``permissive`` mode, answered
with ``PLAINTEXT_REFUSAL`` and closed before a byte is parsed in ``strict``.
A handshake that fails (a client certificate from another CA, none at all, a caller that
does not trust this server) is logged with the peer and the reason, rate-limited: the
event loop itself logs it only in debug mode, so a misconfigured caller went unseen.
The one port is what lets a fleet move from ``off`` to ``strict`` without a flag day.

How the socket changes hands, and why so:

1. the accepted transport is given up in ``connection_made``, before it reads: a duplicate
   of its socket is kept and the transport aborted (closing one of two descriptors of a
   socket sends nothing to the caller). Pausing it there and upgrading it with
   ``loop.start_tls`` later works on asyncio's loop but not on uvloop, which starts reading
   right after ``connection_made`` returns, paused or not (uvloop 0.23, verified), so the
   first bytes were gone before anything could peek;
2. the first byte is peeked on the duplicate once the loop says it is readable (at most
   ``HEADER_TIMEOUT`` seconds: a connection that never speaks is closed);
3. the socket goes back to the loop with ``loop.connect_accepted_socket``, with the TLS
   context for a ClientHello and without for plaintext, the same call on both loops.
   Its TLS is uvloop's (Cython, with OpenSSL's own buffers) when ``meshlib serve`` runs on
   uvloop (``meshlib[fast]``), asyncio's ``sslproto`` (pure Python) otherwise.

Before this, the first byte was read from the socket, so ``loop.start_tls`` (which cannot be
given bytes already read) was out, and every TLS record went through asyncio's pure-Python
``sslproto.SSLProtocol``, fed by hand, on either loop: bench row 3's limit.

uvicorn does not pass the client certificate to the app, so the verified identity is read
here, once per connection, and every request on it gets ``scope["meshlib.peer"]`` (a
``SpiffeId`` or ``None``) -- set by the server, so no request can forge it. A certificate
that proves no service identity of this trust domain (``_spiffe.py``) ends the connection
here, in either mode, before a byte of HTTP is parsed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .._logsafe import escaped
from ..security import NoServiceIdentity, TlsContexts
from ..security._refusals import PLAINTEXT_REFUSAL, RefusalLog, handshake_refusal
from ._http_guard import HEADER_TIMEOUT, GuardedH11Protocol

__all__ = ["mesh_protocol"]

logger = logging.getLogger("meshlib.tls")

_TLS_RECORD = b"\x16"
_HANDSHAKE_TIMEOUT = 10.0
# An idle keep-alive client may never answer close_notify; asyncio's default 30 s wait kept
# the connection counted as open, so a drain waited its full timeout.
_SHUTDOWN_TIMEOUT = 2.0
_REFUSALS = RefusalLog(logger)
ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def _with_peer(app: ASGIApp, peer: object) -> ASGIApp:
    async def app_with_peer(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        scope["meshlib.peer"] = peer
        await app(scope, receive, send)

    return app_with_peer


def mesh_protocol(contexts: TlsContexts) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with the mesh's TLS in front."""
    strict = contexts.mode == "strict"

    class MeshHTTPProtocol(GuardedH11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._mesh_app: Any = getattr(self, "app")  # noqa: B009 - untyped in uvicorn
            self._mesh_accept: asyncio.Task[None] | None = None
            self._mesh_http = False
            self._mesh_refused = False
            self._mesh_refusing: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if self._mesh_accept is None:  # the accepted transport: given up unread (1.)
                try:
                    sock = _duplicate(transport)
                except OSError:  # out of descriptors: refused, as an accept would have been
                    transport.abort()  # type: ignore[attr-defined]
                    return
                transport.abort()  # type: ignore[attr-defined]
                self._mesh_accept = self.loop.create_task(self._mesh_hand_over(sock))
                return
            if self._mesh_refused:  # strict, and plaintext: answered once its bytes are read
                self._mesh_refusing = transport  # type: ignore[assignment]
                return
            ssl_object = transport.get_extra_info("ssl_object")
            try:
                peer = contexts.caller(ssl_object.getpeercert()) if ssl_object else None
            except NoServiceIdentity as exc:
                _REFUSALS.refused(escaped(str(exc)), transport.get_extra_info("peername"))
                self._mesh_refused = True  # bytes already decrypted must not reach HTTP
                transport.close()
                return
            self._mesh_http = True
            self.app = _with_peer(self._mesh_app, peer)
            super().connection_made(transport)  # type: ignore[arg-type]

        async def _mesh_hand_over(self, sock: socket.socket) -> None:
            """Steps 2. and 3. of the module docstring."""
            loop = self.loop
            peer = _peername(sock)
            handed = False
            try:
                async with asyncio.timeout(HEADER_TIMEOUT):
                    first = await _peek(loop, sock)
                if not first:
                    return  # gone before its first byte
                handed = True  # the loop closes the socket from here on, whatever happens
                if first != _TLS_RECORD:
                    if strict:
                        _REFUSALS.refused("plaintext at a MESH_TLS=strict port", peer)
                        self._mesh_refused = True
                    await loop.connect_accepted_socket(lambda: self, sock)
                    return
                try:
                    await loop.connect_accepted_socket(
                        lambda: self,
                        sock,
                        ssl=contexts.base_server,
                        ssl_handshake_timeout=_HANDSHAKE_TIMEOUT,
                        ssl_shutdown_timeout=_SHUTDOWN_TIMEOUT,
                    )
                except OSError as exc:  # ssl.SSLError is one
                    reason = handshake_refusal(exc)
                    if reason is not None:
                        _REFUSALS.refused(reason, peer)
            except OSError:  # a reset, or no first byte in time (TimeoutError is an OSError)
                pass
            finally:
                if not handed:
                    sock.close()

        def data_received(self, data: bytes) -> None:
            if not self._mesh_refused:
                super().data_received(data)
                return
            refusing, self._mesh_refusing = self._mesh_refusing, None
            if refusing is not None:
                refusing.write(PLAINTEXT_REFUSAL)  # says why; a bare close said nothing
                refusing.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._mesh_refused or not self._mesh_http:
                return  # never got as far as HTTP (or the accepted transport, given up)
            super().connection_lost(exc)

    return MeshHTTPProtocol


def _duplicate(transport: asyncio.BaseTransport) -> socket.socket:
    """A second descriptor of the transport's socket, non-blocking, closed on exec."""
    sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    sock.setblocking(False)
    return sock


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The socket's first byte, left in its buffer; ``b""`` at end of file."""
    fd = sock.fileno()
    while True:
        try:
            return sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _set_once, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():  # the loop may call again before the reader is removed
        future.set_result(None)


def _peername(sock: socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return None
