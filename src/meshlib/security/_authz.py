"""Authorization: may this caller call this service?

The caller is the SPIFFE ID its verified client certificate proves (None for a plaintext
caller in permissive mode). Without Consul, ``MESH_ALLOWED_CALLERS`` and
``MESH_DENIED_CALLERS`` decide (deny wins; an unset allow list allows any caller, an
unidentified caller is allowed only when nothing is restricted). With Consul, its
intentions decide as well (_intentions.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ._spiffe import SpiffeId

__all__ = ["Authorizer", "Decision", "LocalAuthorizer"]


@dataclass(frozen=True, slots=True)
class Decision:
    """An authorization verdict and why (logged with denials)."""

    allowed: bool
    reason: str


class Authorizer(Protocol):
    """Decides whether ``caller`` may make a request."""

    def decide(
        self, caller: SpiffeId | None, method: str, path: str, headers: dict[str, str]
    ) -> Decision:
        """The verdict for one request."""


class LocalAuthorizer:
    """Allow and deny lists of caller service names."""

    def __init__(
        self, trust_domain: str | None, allowed: frozenset[str] | None, denied: frozenset[str]
    ) -> None:
        self.trust_domain = trust_domain
        self.allowed = allowed
        self.denied = denied

    @property
    def restricts(self) -> bool:
        """Whether any rule is set (otherwise every caller is allowed)."""
        return self.allowed is not None or bool(self.denied)

    def decide(
        self, caller: SpiffeId | None, method: str, path: str, headers: dict[str, str]
    ) -> Decision:
        """Deny list, then allow list; callers from another trust domain never match."""
        if not self.restricts:
            return Decision(True, "no caller restrictions")
        if caller is None:
            return Decision(False, "the caller presented no verified identity")
        if self.trust_domain is not None and caller.trust_domain != self.trust_domain:
            return Decision(False, f"{caller} is from another trust domain")
        if caller.service in self.denied or "*" in self.denied:
            return Decision(False, f"{caller.service} is in MESH_DENIED_CALLERS")
        if self.allowed is not None and not (caller.service in self.allowed or "*" in self.allowed):
            return Decision(False, f"{caller.service} is not in MESH_ALLOWED_CALLERS")
        return Decision(True, f"{caller.service} is allowed")
