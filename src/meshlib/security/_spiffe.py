"""SPIFFE identities: ``spiffe://<trust-domain>/ns/<namespace>/dc/<dc>/svc/<service>``.

The same form Consul Connect uses, so a meshlib service and an Envoy- or
``consul connect proxy``-fronted one recognise each other. An identity is only ever taken
from a certificate the TLS handshake verified, never from a header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["SpiffeId", "from_peercert"]

_FORM = re.compile(
    r"^spiffe://(?P<td>[A-Za-z0-9.-]+)/ns/(?P<ns>[A-Za-z0-9_.-]+)"
    r"/dc/(?P<dc>[A-Za-z0-9_.-]+)/svc/(?P<svc>[A-Za-z0-9_.-]+)$"
)


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload identity in the mesh."""

    trust_domain: str
    service: str
    datacenter: str = "dc1"
    namespace: str = "default"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse a service SPIFFE ID; ``ValueError`` for anything else."""
        match = _FORM.match(uri)
        if match is None:
            raise ValueError(f"{uri!r} is not a service SPIFFE ID")
        return cls(match["td"].lower(), match["svc"], match["dc"], match["ns"])

    def __str__(self) -> str:
        return (
            f"spiffe://{self.trust_domain}/ns/{self.namespace}/dc/{self.datacenter}"
            f"/svc/{self.service}"
        )

    def same_service(self, other: SpiffeId) -> bool:
        """Same trust domain, namespace and service (any datacenter: failover crosses them)."""
        return (self.trust_domain, self.namespace, self.service) == (
            other.trust_domain,
            other.namespace,
            other.service,
        )


def from_peercert(cert: dict[str, Any] | None) -> SpiffeId | None:
    """The SPIFFE ID in a verified peer certificate (``SSLSocket.getpeercert()``), if any."""
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI" and isinstance(value, str) and value.startswith("spiffe://"):
            try:
                return SpiffeId.parse(value)
            except ValueError:
                return None
    return None
