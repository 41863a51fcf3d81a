"""The CA signer: leaves for services without handing them the root key.

``meshlib ca serve`` runs this as its own process, as the user that owns the local CA's
directory. A service never reads that directory: it makes its own key, sends a certificate
signing request over a Unix socket (``MESH_TLS_SIGNER``) and gets back a leaf for the one
SPIFFE ID it is entitled to, with the trust bundle. Entitlement comes from the kernel, not
from the request: the socket's peer credentials (``SO_PEERCRED``) give the caller's uid, and
the signer policy file maps uids to the service names they may hold::

    # user (name or uid)   services it may hold
    forecast               forecast
    1001                   billing billing-worker

So a compromised service can obtain a leaf only for itself: it never holds a key that can sign
another identity. Rotation stays as it was: ``meshlib ca rotate`` changes the directory, the
signer reads it on every request, and services ask for the trust bundle's fingerprint every
second (the ``status`` request) and renew when it or the signing root changes.

The protocol is one JSON object per line each way, one request per connection:

* ``{"op": "status"}`` → ``{"trust_domain", "roots", "switch"}`` (public; anyone may ask)
* ``{"op": "sign", "service", "datacenter", "csr", "ttl"}`` → ``{"cert", "roots",
  "not_after"}``, or ``{"error": "..."}`` when the caller is not entitled to ``service``.

Only the CSR's public key is used: its names are ignored, the leaf's identity is built here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pwd
import socket
import socketserver
import stat
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ._local_ca import LocalCA, sign_leaf
from ._spiffe import SpiffeId

__all__ = [
    "SignerError",
    "SignerPolicy",
    "SignerServer",
    "request_leaf",
    "request_status",
]

logger = logging.getLogger("meshlib.tls")

#: a request or an answer is a few kilobytes; more is refused
MAX_MESSAGE = 64 * 1024
_TIMEOUT = 10.0


class SignerError(Exception):
    """The signer could not be reached, or refused the request (one line)."""


@dataclass(frozen=True)
class SignerPolicy:
    """Which uid may hold which service names."""

    services_by_uid: Mapping[int, frozenset[str]]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SignerPolicy:
        """Read a policy file: ``user service [service ...]`` per line, ``#`` comments."""
        entries: dict[int, frozenset[str]] = {}
        for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].split()
            if not line:
                continue
            if len(line) < 2:
                raise ValueError(f"{path}:{number}: expected a user and at least one service")
            user, *services = line
            uid = int(user) if user.isdigit() else _uid_of(user, path, number)
            entries[uid] = entries.get(uid, frozenset()) | frozenset(services)
        return cls(entries)

    def allowed(self, uid: int) -> frozenset[str]:
        """The service names ``uid`` may hold."""
        return self.services_by_uid.get(uid, frozenset())


def _uid_of(user: str, path: str | os.PathLike[str], number: int) -> int:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"{path}:{number}: no such user {user!r}") from None


class SignerServer:
    """Serves leaves from ``ca`` on a Unix socket at ``path``, as ``policy`` allows."""

    def __init__(
        self,
        ca: LocalCA,
        policy: SignerPolicy,
        path: str | os.PathLike[str],
        *,
        max_ttl: float = 8 * 3600.0,
    ) -> None:
        self.ca = ca
        self.policy = policy
        self.path = Path(path)
        self.max_ttl = max_ttl
        self.trust_domain = ca.load_info().trust_domain
        _remove_stale_socket(self.path)
        self._server = _UnixServer(str(self.path), _Handler)
        self._server.signer = self
        # Anyone may connect: entitlement is checked per request by peer credentials.
        os.chmod(self.path, 0o666)
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Answer requests until ``close``."""
        self._server.serve_forever(poll_interval=0.5)

    def start(self) -> SignerServer:
        """Answer requests in a background thread."""
        self._thread = threading.Thread(
            target=self.serve_forever, name="meshlib-ca-signer", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop answering and remove the socket."""
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)

    def answer(self, request: Any, uid: int) -> dict[str, Any]:
        """The answer to one decoded request from a peer with ``uid``."""
        if not isinstance(request, dict):
            return {"error": "expected a JSON object"}
        op = request.get("op")
        if op == "status":
            cert, _, bundle = self.ca.signer()
            return {
                "trust_domain": self.trust_domain,
                "roots": bundle.decode(),
                "switch": self.ca.signing_switch(),
                "signer": cert.serial_number,
            }
        if op == "sign":
            return self._sign(request, uid)
        return {"error": f"unknown op {op!r}: expected status or sign"}

    def _sign(self, request: dict[str, Any], uid: int) -> dict[str, Any]:
        service, datacenter = request.get("service"), request.get("datacenter") or "dc1"
        if not isinstance(service, str) or not isinstance(datacenter, str):
            return {"error": "expected service and datacenter as strings"}
        allowed = self.policy.allowed(uid)
        if service not in allowed:
            logger.warning("refused a leaf for %r to uid %d", service, uid)
            may = ", ".join(sorted(allowed)) or "nothing (not in the signer policy)"
            return {"error": f"uid {uid} may not hold service {service!r}; it may hold: {may}"}
        try:
            identity = SpiffeId.parse(str(SpiffeId(self.trust_domain, service, datacenter)))
            csr = x509.load_pem_x509_csr(str(request.get("csr", "")).encode())
        except (ValueError, TypeError) as exc:
            return {"error": f"bad request: {exc}"}
        if not csr.is_signature_valid:
            return {"error": "the CSR's signature is not valid"}
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return {"error": "expected an EC P-256 key in the CSR"}
        ttl = request.get("ttl")
        seconds = min(float(ttl), self.max_ttl) if isinstance(ttl, int | float) else self.max_ttl
        signer, key, bundle = self.ca.signer()
        cert_pem, not_after = sign_leaf(
            signer, key, identity, public, dt.timedelta(seconds=max(seconds, 1.0))
        )
        logger.info("issued a leaf for %s to uid %d", identity, uid)
        return {
            "cert": cert_pem.decode(),
            "roots": bundle.decode(),
            "not_after": not_after.timestamp(),
        }


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    signer: SignerServer


class _Handler(socketserver.StreamRequestHandler):
    server: _UnixServer

    def handle(self) -> None:
        self.connection.settimeout(_TIMEOUT)
        try:
            creds = self.connection.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
            _, uid, _ = struct.unpack("3i", creds)
            line = self.rfile.readline(MAX_MESSAGE + 1)
            if len(line) > MAX_MESSAGE:
                answer: dict[str, Any] = {"error": f"request over {MAX_MESSAGE} bytes"}
            else:
                try:
                    request = json.loads(line)
                except ValueError:
                    answer = {"error": "expected one JSON object on one line"}
                else:
                    answer = self.server.signer.answer(request, uid)
        except OSError:
            return
        except Exception as exc:  # one bad request never stops the signer
            logger.warning("signer request failed: %s", exc)
            answer = {"error": f"the signer failed: {exc}"}
        try:
            self.wfile.write(json.dumps(answer).encode() + b"\n")
        except OSError:
            return


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left over from a signer that died
    else:
        raise FileExistsError(f"a signer already listens on {path}")
    finally:
        probe.close()


# ----------------------------------------------------------------------------- the client side


def _call(path: str, request: dict[str, Any]) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(_TIMEOUT)
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as reader:
                line = reader.readline(MAX_MESSAGE * 4)
    except OSError as exc:
        raise SignerError(f"cannot reach the signer at {path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(line)
    except ValueError:
        raise SignerError(f"the signer at {path} answered something that is not JSON") from None
    if not isinstance(answer, dict):
        raise SignerError(f"the signer at {path} answered something that is not an object")
    if "error" in answer:
        raise SignerError(f"the signer at {path} refused: {answer['error']}")
    return answer


def request_status(path: str) -> dict[str, Any]:
    """The signer's trust domain, trust bundle (PEM text) and pending switch time."""
    return _call(path, {"op": "status"})


def request_leaf(
    path: str, service: str, datacenter: str, ttl: float
) -> tuple[bytes, bytes, bytes, dt.datetime]:
    """A new key and a leaf for it: (certificate PEM, key PEM, roots PEM, expiry)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    answer = _call(
        path,
        {
            "op": "sign",
            "service": service,
            "datacenter": datacenter,
            "ttl": ttl,
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        },
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    not_after = dt.datetime.fromtimestamp(float(answer["not_after"]), dt.UTC)
    return answer["cert"].encode(), key_pem, answer["roots"].encode(), not_after
