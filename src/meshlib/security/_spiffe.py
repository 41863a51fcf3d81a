"""SPIFFE identities: ``spiffe://<trust-domain>/ns/<namespace>/dc/<dc>/svc/<service>``.

The same form Consul Connect uses, so a meshlib service and an Envoy- or
``consul connect proxy``-fronted one recognise each other. An identity is only ever taken
from a certificate the TLS handshake verified, never from a header.

A certificate proves an identity only as an SVID does (the SPIFFE X.509-SVID rules): exactly
one URI SAN, a service ID, of the mesh's trust domain. Anything else the mesh CA may have
signed -- an agent's ``spiffe://<td>/agent/client/dc/dc1/id/node1``, a gateway's, a service
of another trust domain, a certificate with several URIs -- proves *no* identity, and a
caller presenting one is refused, never taken for an unidentified (plaintext) caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["NoServiceIdentity", "SpiffeId", "from_peercert", "identity_of"]

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


class NoServiceIdentity(ValueError):
    """A verified certificate that proves no service identity of the mesh's trust domain."""


def identity_of(cert: dict[str, Any], trust_domain: str | None = None) -> SpiffeId:
    """The one service identity a verified certificate (``getpeercert()``) proves.

    Raises:
        NoServiceIdentity: the certificate has no URI SAN or several, its URI is not a
            service SPIFFE ID, or (``trust_domain`` given) it is of another trust domain.
    """
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    if len(uris) != 1:
        raise NoServiceIdentity(f"the certificate has {len(uris)} URI SANs, expected one")
    try:
        identity = SpiffeId.parse(str(uris[0]))
    except ValueError as exc:
        raise NoServiceIdentity(str(exc)) from None
    if trust_domain is not None and identity.trust_domain != trust_domain.lower():
        raise NoServiceIdentity(f"{identity} is not of the trust domain {trust_domain!r}")
    return identity


def from_peercert(cert: dict[str, Any] | None, trust_domain: str | None = None) -> SpiffeId | None:
    """The service identity a verified peer certificate proves; None if it proves none."""
    if not cert:
        return None
    try:
        return identity_of(cert, trust_domain)
    except NoServiceIdentity:
        return None
