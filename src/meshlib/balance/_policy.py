"""The balancer protocol: pick one endpoint from the candidates.

A balancer is created per service and holds whatever state its policy needs (a round
robin position, a hash ring). It never sees ejected endpoints or endpoints already tried
by this request: the caller filters those out, so ``candidates`` is never empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ._state import EndpointState

__all__ = ["Balancer"]


class Balancer(Protocol):
    """Picks one endpoint for one attempt."""

    def pick(self, candidates: Sequence[EndpointState], hash_key: str | None) -> EndpointState:
        """Choose from ``candidates`` (non-empty). ``hash_key`` is set only for ``ring_hash``."""
