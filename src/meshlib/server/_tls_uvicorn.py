"""Mesh TLS for uvicorn: one port for mTLS (and, when permissive, plaintext), and the
caller's verified identity in the ASGI scope.

uvicorn runs without its own TLS; this HTTP protocol class looks at the first byte of each
connection. A TLS ClientHello (0x16) is handed to asyncio's TLS layer with the mesh's base
server context (its ``sni_callback`` points the handshake at the newest rotated context),
and the HTTP protocol starts once the handshake has verified the client. Anything else is
plaintext: served in ``permissive`` mode, closed before a byte is parsed in ``strict``.
A handshake that fails (a client certificate from another CA, none at all, a caller that
does not trust this server) is logged with the peer and the reason, rate-limited: asyncio
itself logs it only in debug mode, so a misconfigured caller went unseen.
The one port is what lets a fleet move from ``off`` to ``strict`` without a flag day.

The bytes already read are fed to ``asyncio.sslproto.SSLProtocol`` (a buffered protocol)
directly, because ``loop.start_tls`` cannot be given data already consumed from the
socket. That class is asyncio's own TLS layer, the one ``start_tls`` uses.

uvicorn does not pass the client certificate to the app, so the verified identity is read
here, once per connection, and every request on it gets ``scope["meshlib.peer"]`` (a
``SpiffeId`` or ``None``) -- set by the server, so no request can forge it. A certificate
that proves no service identity of this trust domain (``_spiffe.py``) ends the connection
here, in either mode, before a byte of HTTP is parsed.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import sslproto
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .._logsafe import escaped
from ..security import NoServiceIdentity, TlsContexts
from ..security._refusals import PLAINTEXT_REFUSAL, RefusalLog, handshake_refusal
from ._http_guard import HEADER_TIMEOUT, GuardedH11Protocol

__all__ = ["mesh_protocol"]

logger = logging.getLogger("meshlib.tls")

_TLS_RECORD = 0x16
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
            self._mesh_raw: asyncio.Transport | None = None
            self._mesh_http = False
            self._mesh_refused = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if self._mesh_raw is None and not self._mesh_http:
                self._mesh_raw = transport  # type: ignore[assignment]
                # wait for the first byte, but not forever (a connection that never speaks)
                self.loop.call_later(HEADER_TIMEOUT, self._mesh_first_byte_timeout)
                return
            ssl_object = transport.get_extra_info("ssl_object")
            try:
                peer = contexts.caller(ssl_object.getpeercert()) if ssl_object else None
            except NoServiceIdentity as exc:
                _REFUSALS.refused(escaped(str(exc)), transport.get_extra_info("peername"))
                self._mesh_refused = True  # bytes already decrypted must not reach HTTP
                transport.close()
                return
            self.app = _with_peer(self._mesh_app, peer)
            super().connection_made(transport)  # type: ignore[arg-type]

        def data_received(self, data: bytes) -> None:
            if self._mesh_refused:
                return
            if self._mesh_http:
                super().data_received(data)
                return
            raw = self._mesh_raw
            assert raw is not None
            self._mesh_http = True
            if data[:1] == bytes([_TLS_RECORD]):
                loop = asyncio.get_running_loop()
                handshake = loop.create_future()  # asyncio's way to tell how it ended
                handshake.add_done_callback(_log_failed_handshake(raw.get_extra_info("peername")))
                tls = sslproto.SSLProtocol(
                    loop,
                    self,
                    contexts.base_server,
                    handshake,
                    server_side=True,
                    ssl_handshake_timeout=10,
                    # An idle keep-alive client may never answer close_notify; asyncio's
                    # default 30 s wait kept the connection counted as open, so a drain
                    # waited its full timeout.
                    ssl_shutdown_timeout=2,
                )
                raw.set_protocol(tls)
                tls.connection_made(raw)
                _feed(tls, data)
                return
            if strict:
                _REFUSALS.refused(
                    "plaintext at a MESH_TLS=strict port", raw.get_extra_info("peername")
                )
                self._mesh_refused = True
                raw.write(PLAINTEXT_REFUSAL)  # says why; a bare close said nothing
                raw.close()
                return
            self.connection_made(raw)
            super().data_received(data)

        def _mesh_first_byte_timeout(self) -> None:
            if not self._mesh_http and self._mesh_raw is not None:
                self._mesh_raw.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if (
                self._mesh_refused
                or not self._mesh_http
                or getattr(self, "transport", None) is None
            ):
                return  # never got as far as HTTP
            super().connection_lost(exc)

    return MeshHTTPProtocol


def _log_failed_handshake(peer: object) -> Callable[[asyncio.Future[None]], None]:
    def done(handshake: asyncio.Future[None]) -> None:
        if handshake.cancelled():
            return
        exc = handshake.exception()  # retrieved, so asyncio does not complain of it at exit
        reason = handshake_refusal(exc) if exc is not None else None
        if reason is not None:
            _REFUSALS.refused(reason, peer)

    return done


def _feed(protocol: sslproto.SSLProtocol, data: bytes) -> None:
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]
