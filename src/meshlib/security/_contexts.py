"""SSL contexts built from the current TLS material, kept current as it rotates.

Server side, the rotation that can also *remove* trust is a fixed base context whose
``sni_callback`` points each new connection at the newest context (FINDINGS.md: measured
with zero failed requests under uvicorn, gunicorn and werkzeug). The base context already
requires (strict) or asks for (permissive) a client certificate.

Client side, every new material (a renewed leaf or a changed trust bundle) makes a new
context with a new ``generation``; callers start new connection pools for it, and
established connections stay authenticated. A live context is never changed:
``load_cert_chain`` installs the certificate and then the key, and a handshake running in
another thread between the two presents the new certificate with the old key (the server
refuses it; under TLS 1.3 the client only sees the connection close). Measured: 1 failed
request in 1699 with 3-second leaves before this was fixed.

PEM reaches ``load_cert_chain`` through files in a private directory (mode 0700, files
0600) that are deleted as soon as they are loaded: ``ssl`` reads keys only from files.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
import threading
from typing import Any, Literal

from ._material import MaterialSource, TlsMaterial
from ._spiffe import SpiffeId, identity_of

__all__ = ["TlsContexts"]

_ALPN = ["http/1.1"]


class TlsContexts:
    """The current client and server contexts of this process."""

    def __init__(self, source: MaterialSource, mode: Literal["permissive", "strict"]) -> None:
        self.source = source
        self.mode = mode
        self._lock = threading.Lock()
        material = source.current()
        self.material = material
        self.generation = 0
        self.client = self._client_context(material)
        self.server = self._server_context(material)
        self.base_server = self._server_context(material)
        self.base_server.sni_callback = self._point_at_newest
        source.subscribe(self._rotate)

    @property
    def trust_domain(self) -> str:
        """The mesh's trust domain: the one this process's own identity is of."""
        return self.material.identity.trust_domain

    def caller(self, cert: dict[str, Any] | None) -> SpiffeId | None:
        """The identity a caller's verified certificate proves; None when it sent none.

        Raises:
            NoServiceIdentity: it sent a certificate that proves no service identity of
                this trust domain (the server must refuse the connection).
        """
        if cert is None:
            return None
        return identity_of(cert, self.trust_domain)

    def _point_at_newest(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, base: ssl.SSLContext
    ) -> None:
        sslobj.context = self.server

    def _rotate(self, material: TlsMaterial) -> None:
        with self._lock:
            server = self._server_context(material)
            client = self._client_context(material)
            self.client, self.generation = client, self.generation + 1
            self.server = server
            self.material = material

    def _client_context(self, material: TlsMaterial) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # the SPIFFE ID is checked instead (_verify.py)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=material.roots_pem.decode())
        ctx.set_alpn_protocols(_ALPN)
        _load_chain(ctx, material)
        return ctx

    def _server_context(self, material: TlsMaterial) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED if self.mode == "strict" else ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=material.roots_pem.decode())
        ctx.set_alpn_protocols(_ALPN)
        _load_chain(ctx, material)
        return ctx


def _load_chain(ctx: ssl.SSLContext, material: TlsMaterial) -> None:
    directory = tempfile.mkdtemp(prefix="meshlib-tls-")  # mode 0700
    try:
        cert = os.path.join(directory, "cert.pem")
        key = os.path.join(directory, "key.pem")
        for path, data in ((cert, material.cert_pem), (key, material.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        ctx.load_cert_chain(cert, key)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
