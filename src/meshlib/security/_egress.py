"""Egress: which hosts outside the mesh this process may call.

``MESH_EGRESS=deny`` refuses every host that is not a mesh service unless
``MESH_EGRESS_ALLOW`` names it (exactly, or as ``*.domain``). The refusal happens before
any connection is opened, with ``meshlib.EgressDenied``.
"""

from __future__ import annotations

from .._exceptions import EgressDenied

__all__ = ["EgressPolicy"]


class EgressPolicy:
    """Allow or refuse a foreign host."""

    def __init__(self, mode: str, allowed: tuple[str, ...]) -> None:
        self.deny = mode == "deny"
        self._exact = frozenset(p for p in allowed if not p.startswith("*."))
        self._suffixes = tuple(p[1:] for p in allowed if p.startswith("*."))

    def allows(self, host: str) -> bool:
        """Whether a request to ``host`` (not a mesh service) may go out."""
        if not self.deny:
            return True
        host = host.lower().rstrip(".")
        return host in self._exact or host.endswith(self._suffixes)

    def check(self, host: str) -> None:
        """Raise ``EgressDenied`` unless ``host`` is allowed."""
        if not self.allows(host):
            raise EgressDenied(
                f"egress to {host!r} is denied: it is not a mesh service and MESH_EGRESS=deny "
                "does not list it in MESH_EGRESS_ALLOW",
                service=host,
            )
