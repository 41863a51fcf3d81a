"""TLS material (leaf, key, trust bundle) and the sources that keep it current.

A source publishes a new immutable ``TlsMaterial`` whenever the leaf is renewed or the
trust bundle changes; the contexts (_contexts.py) rebuild from it. Three sources:

* ``SignerSource`` (the embedded default): asks the signer (``meshlib ca serve``, reached
  on the Unix socket ``MESH_TLS_SIGNER``) for a leaf for its own key, renews it after two
  thirds of its lifetime, and asks the signer every ``check_interval`` whether the trust
  bundle or the signing root changed (a ``meshlib ca rotate``). The process never holds a
  key that can sign.
* ``LocalSource`` (development only, ``MESH_TLS_CA=local``): the same, but the process
  signs its leaf itself with the root key it reads from ``MESH_TLS_DIR``, and re-reads the
  directory when its files change.
* ``ConsulSource`` (_consul_ca.py): Consul Connect's leaf and roots, by blocking queries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ._spiffe import SpiffeId

if TYPE_CHECKING:
    from ._local_ca import LocalCA

# cryptography (through _local_ca and _signer) is imported where a leaf is made or read,
# not with this module: a process without mesh TLS never loads it (some 8 MiB).

__all__ = [
    "Issuer",
    "LocalSource",
    "MaterialSource",
    "RenewingSource",
    "SignerSource",
    "TlsMaterial",
]

logger = logging.getLogger("meshlib.tls")


@dataclass(frozen=True)
class TlsMaterial:
    """One version of this process's TLS identity and trust. Never logged."""

    identity: SpiffeId
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    roots_pem: bytes = field(repr=False)
    not_after: dt.datetime

    @property
    def roots_digest(self) -> str:
        """Changes exactly when the trust bundle changes."""
        return hashlib.sha256(self.roots_pem).hexdigest()


MaterialListener = Callable[[TlsMaterial], None]


class MaterialSource(Protocol):
    """Where TLS material comes from."""

    def current(self) -> TlsMaterial:
        """The newest material (blocks, bounded, only until the first is available)."""

    def subscribe(self, listener: MaterialListener) -> None:
        """Call ``listener`` with every new material."""

    def close(self) -> None:
        """Stop renewing."""


class Issuer(Protocol):
    """Who signs this process's leaves: the signer, or (development) the process itself."""

    def fingerprint(self) -> object:
        """Changes whenever the trust bundle or the signing root may have changed."""

    def signing_switch(self) -> float:
        """UNIX time from which a new root signs (0 when no rotation is pending)."""

    def issue(self, identity: SpiffeId, ttl: dt.timedelta) -> TlsMaterial:
        """A new key and a leaf for ``identity``, with the trust bundle."""


class LocalIssuer:
    """Signs in this process with the local CA's root key (development only)."""

    def __init__(self, ca: LocalCA) -> None:
        self.ca = ca

    def fingerprint(self) -> object:
        """The CA files' modification times."""
        return self.ca.fingerprint()

    def signing_switch(self) -> float:
        """From the CA directory."""
        return self.ca.signing_switch()

    def issue(self, identity: SpiffeId, ttl: dt.timedelta) -> TlsMaterial:
        """Sign a leaf with the root key."""
        signer, key, bundle = self.ca.signer()
        from ._local_ca import issue_leaf

        cert_pem, key_pem, not_after = issue_leaf(signer, key, identity, ttl)
        return TlsMaterial(identity, cert_pem, key_pem, bundle, not_after)


class SignerIssuer:
    """Asks the signer at the Unix socket ``path``; the key never leaves this process."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._switch = 0.0
        self.trust_domain: str = str(self.fingerprint()[0])

    def fingerprint(self) -> tuple[object, ...]:
        """The signer's trust domain, bundle and signing root (one request)."""
        from ._signer import request_status

        status = request_status(self.path)
        self._switch = float(status.get("switch") or 0.0)
        return (status["trust_domain"], status["roots"], status.get("signer"), self._switch)

    def signing_switch(self) -> float:
        """As of the last ``fingerprint``."""
        return self._switch

    def issue(self, identity: SpiffeId, ttl: dt.timedelta) -> TlsMaterial:
        """Send a CSR for a new key; the signer decides whether this process may hold it."""
        from ._signer import request_leaf

        cert_pem, key_pem, roots_pem, not_after = request_leaf(
            self.path, identity.service, identity.datacenter, ttl.total_seconds()
        )
        return TlsMaterial(identity, cert_pem, key_pem, roots_pem, not_after)


class RenewingSource:
    """Leaves from an ``Issuer``, renewed in a background thread."""

    def __init__(
        self,
        issuer: Issuer,
        identity: SpiffeId,
        ttl: float,
        *,
        check_interval: float = 1.0,
    ) -> None:
        self.issuer = issuer
        self.identity = identity
        self.ttl = dt.timedelta(seconds=ttl)
        self.check_interval = check_interval
        self._listeners: list[MaterialListener] = []
        self._stop = threading.Event()
        self._fingerprint = issuer.fingerprint()
        self._switch = issuer.signing_switch()
        self._material = self._issue()
        self._start()
        _RENEWING.add(self)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="meshlib-tls", daemon=True)
        self._thread.start()

    def current(self) -> TlsMaterial:
        """The newest material."""
        return self._material

    def subscribe(self, listener: MaterialListener) -> None:
        """Call ``listener`` (from the renewal thread) with every new material."""
        self._listeners.append(listener)

    def close(self) -> None:
        """Stop the renewal thread."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def _issue(self) -> TlsMaterial:
        material = self.issuer.issue(self.identity, self.ttl)
        logger.info(
            "issued a leaf for %s, valid until %s", self.identity, f"{material.not_after:%H:%M:%S}"
        )
        return material

    def _renew_at(self) -> dt.datetime:
        # From the leaf itself: a signer may have granted less than ``ttl``.
        from cryptography import x509

        start = x509.load_pem_x509_certificate(self._material.cert_pem).not_valid_before_utc
        return start + (self._material.not_after - start) * 2 / 3

    def _run(self) -> None:
        while not self._stop.wait(self.check_interval):
            try:
                fingerprint = self.issuer.fingerprint()
                now = dt.datetime.now(dt.UTC)
                # due: renewal time, or a pending rotation's switch to the new root passed
                due = now >= self._renew_at() or 0 < self._switch <= now.timestamp()
                if fingerprint == self._fingerprint and not due:
                    continue
                material = self._issue()  # raises if the CA is mid-write: retry next tick
                self._fingerprint = fingerprint
                self._switch = self.issuer.signing_switch()
                if self._switch <= now.timestamp():
                    self._switch = 0.0
                self._material = material
            except Exception as exc:  # keep the current leaf; try again next tick
                logger.warning("could not renew the TLS leaf: %s", exc)
                continue
            for listener in self._listeners:
                try:
                    listener(self._material)
                except Exception:
                    logger.exception("a TLS material listener failed")


#: the sources renewing now, restarted in a forked child (threads do not follow a fork: a
#: pre-forking server's workers kept their parent's leaf until it expired)
_RENEWING: weakref.WeakSet[RenewingSource] = weakref.WeakSet()


def _restart_in_child() -> None:
    for source in list(_RENEWING):
        if not source._stop.is_set():
            source._start()


os.register_at_fork(after_in_child=_restart_in_child)


class LocalSource(RenewingSource):
    """Leaves this process signs itself with the local CA's root key (development only)."""

    def __init__(
        self, ca: LocalCA, identity: SpiffeId, ttl: float, *, check_interval: float = 1.0
    ) -> None:
        self.ca = ca
        super().__init__(LocalIssuer(ca), identity, ttl, check_interval=check_interval)


class SignerSource(RenewingSource):
    """Leaves from the signer at the Unix socket ``path`` (``meshlib ca serve``)."""

    def __init__(
        self, path: str, service: str, datacenter: str, ttl: float, *, check_interval: float = 1.0
    ) -> None:
        issuer = SignerIssuer(path)
        identity = SpiffeId(issuer.trust_domain, service, datacenter)
        super().__init__(issuer, identity, ttl, check_interval=check_interval)
