"""TLS material (leaf, key, trust bundle) and the sources that keep it current.

A source publishes a new immutable ``TlsMaterial`` whenever the leaf is renewed or the
trust bundle changes; the contexts (_contexts.py) rebuild from it. Two sources:

* ``LocalSource``: issues its own short-lived leaf from the local CA in ``MESH_TLS_DIR``,
  renews it after two thirds of its lifetime, and re-reads the CA directory when its files
  change (a ``meshlib ca rotate`` reaches the process within ``check_interval``).
* ``ConsulSource`` (_consul_ca.py): Consul Connect's leaf and roots, by blocking queries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ._local_ca import LocalCA, issue_leaf
from ._spiffe import SpiffeId

__all__ = ["LocalSource", "MaterialSource", "TlsMaterial"]

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


class LocalSource:
    """Leaves from the local CA, renewed in a background thread."""

    def __init__(
        self,
        ca: LocalCA,
        identity: SpiffeId,
        ttl: float,
        *,
        check_interval: float = 1.0,
    ) -> None:
        self.ca = ca
        self.identity = identity
        self.ttl = dt.timedelta(seconds=ttl)
        self.check_interval = check_interval
        self._listeners: list[MaterialListener] = []
        self._stop = threading.Event()
        self._fingerprint = ca.fingerprint()
        self._switch = ca.signing_switch()
        self._material = self._issue()
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
        signer, key, bundle = self.ca.signer()
        cert_pem, key_pem, not_after = issue_leaf(signer, key, self.identity, self.ttl)
        logger.info("issued a leaf for %s, valid until %s", self.identity, f"{not_after:%H:%M:%S}")
        return TlsMaterial(self.identity, cert_pem, key_pem, bundle, not_after)

    def _renew_at(self) -> dt.datetime:
        lifetime = self.ttl
        issued = self._material.not_after - lifetime
        return issued + lifetime * 2 / 3

    def _run(self) -> None:
        while not self._stop.wait(self.check_interval):
            try:
                fingerprint = self.ca.fingerprint()
                now = dt.datetime.now(dt.UTC)
                # due: renewal time, or a pending rotation's switch to the new root passed
                due = now >= self._renew_at() or 0 < self._switch <= now.timestamp()
                if fingerprint == self._fingerprint and not due:
                    continue
                material = self._issue()  # raises if the CA is mid-write: retry next tick
                self._fingerprint = fingerprint
                self._switch = self.ca.signing_switch()
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
