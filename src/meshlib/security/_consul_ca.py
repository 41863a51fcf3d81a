"""TLS material from Consul Connect's CA: the agent's leaf for this service, and the roots.

Both are watched with blocking queries (``/v1/agent/connect/ca/leaf/<service>`` and
``/v1/agent/connect/ca/roots``) on the process's one watcher (``meshlib.consul.Engine``),
so a renewal or a root rotation reaches the process within seconds. The identity and
trust domain are Consul's: the leaf's ``ServiceURI`` and the roots' ``TrustDomain``.
Start-up waits (bounded) for the first leaf and roots, so a process never serves or calls
without its identity.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from typing import Any
from urllib.parse import quote

from .._config import ConsulSettings
from .._exceptions import ConfigError
from ..consul import Engine
from ._material import MaterialListener, TlsMaterial
from ._spiffe import SpiffeId

__all__ = ["ConsulSource"]

logger = logging.getLogger("meshlib.tls")


class ConsulSource:
    """Consul Connect's leaf and roots for ``service``, kept current."""

    def __init__(self, settings: ConsulSettings, service: str, *, first_timeout: float = 10.0):
        self.service = service
        self._listeners: list[MaterialListener] = []
        self._leaf: dict[str, Any] | None = None
        self._roots: tuple[str, bytes] | None = None
        self._material: TlsMaterial | None = None
        self._ready = threading.Event()
        #: an ACL refusal before the first leaf: start-up stops with it, in one line
        self._refused: str | None = None
        self._engine = Engine.shared(settings)
        leaf = f"/v1/agent/connect/ca/leaf/{quote(service, safe='')}"
        self._stops = [
            self._engine.watch("/v1/agent/connect/ca/roots", self._on_roots),
            self._engine.watch(leaf, self._on_leaf, refused=self._on_refused),
        ]
        if not self._ready.wait(first_timeout) or self._refused is not None:
            self.close()
            if self._refused is not None:
                raise ConfigError(
                    f"MESH_TLS_CA='consul': no certificate for {service!r}: {self._refused}"
                )
            raise ConfigError(
                f"MESH_TLS_CA='consul': expected a certificate for {service!r} from Consul at "
                f"{settings.address} within {first_timeout:g}s (is Connect enabled?)"
            )

    def current(self) -> TlsMaterial:
        """The newest material."""
        assert self._material is not None
        return self._material

    def subscribe(self, listener: MaterialListener) -> None:
        """Call ``listener`` (from the watch thread) with every new material."""
        self._listeners.append(listener)

    def close(self) -> None:
        """Stop the watches."""
        stops, self._stops = self._stops, []
        for stop in stops:
            stop()
        if stops:
            self._engine.release()

    def _on_refused(self, line: str) -> None:
        """Consul's ACLs refused the leaf: before the first one, start-up stops with it."""
        if self._material is None:
            self._refused = line
            self._ready.set()
        else:  # a leaf in hand goes on serving until it expires
            logger.error("cannot renew the leaf of %s: %s", self.service, line)

    def _on_roots(self, body: Any, index: int) -> None:
        roots = body.get("Roots") if isinstance(body, dict) else None
        trust_domain = body.get("TrustDomain") if isinstance(body, dict) else None
        if not isinstance(roots, list) or not isinstance(trust_domain, str) or not roots:
            raise ValueError("CA roots answer without Roots/TrustDomain")
        pems = []
        for root in roots:
            pems.append(str(root["RootCert"]).strip() + "\n")
            pems.extend(str(c).strip() + "\n" for c in root.get("IntermediateCerts") or ())
        bundle = "".join(pems).encode()
        if self._roots != (trust_domain, bundle):
            self._roots = (trust_domain, bundle)
            self._publish()

    def _on_leaf(self, body: Any, index: int) -> None:
        if not isinstance(body, dict) or not {"CertPEM", "PrivateKeyPEM", "ServiceURI"} <= set(
            body
        ):
            raise ValueError("CA leaf answer without CertPEM/PrivateKeyPEM/ServiceURI")
        if self._leaf is None or self._leaf.get("SerialNumber") != body.get("SerialNumber"):
            self._leaf = body
            self._publish()

    def _publish(self) -> None:
        if self._leaf is None or self._roots is None:
            return
        leaf = self._leaf
        identity = SpiffeId.parse(str(leaf["ServiceURI"]))
        not_after = _parse_time(str(leaf.get("ValidBefore", "")))
        material = TlsMaterial(
            identity,
            str(leaf["CertPEM"]).encode(),
            str(leaf["PrivateKeyPEM"]).encode(),
            self._roots[1],
            not_after,
        )
        first = self._material is None
        self._material = material
        logger.info("Consul CA: leaf for %s valid until %s", identity, f"{not_after:%H:%M:%S}")
        # Consul's agent renews the leaf (from half its life on, with jitter) and the watch
        # brings the new one. While Consul is down the leaf in hand goes on serving; if it
        # expires before a renewal arrives, say so once (meshlib_certificate_expiry_seconds
        # shows it too), since every mTLS call with it fails from then on.
        left = (not_after - dt.datetime.now(dt.UTC)).total_seconds()
        self._engine.call_soon(self._expiry_alarm, material, max(left, 0.0))
        if first:
            self._ready.set()
            return
        for listener in self._listeners:
            try:
                listener(material)
            except Exception:
                logger.exception("a TLS material listener failed")

    def _expiry_alarm(self, material: TlsMaterial, delay: float) -> None:
        """On the watch thread: at ``material``'s expiry, an error if nothing replaced it."""
        asyncio.get_running_loop().call_later(delay, self._expired, material)

    def _expired(self, material: TlsMaterial) -> None:
        if self._material is material and self._stops:
            logger.error(
                "the mesh certificate of %s expired at %s UTC and Consul at %s has not "
                "renewed it: mTLS calls to and from this process fail until it does (is "
                "Consul reachable?)",
                material.identity,
                f"{material.not_after:%Y-%m-%d %H:%M:%S}",
                self._engine.address,
            )


def _parse_time(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
