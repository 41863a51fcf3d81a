"""The named load-balancing policies (``MESH_LB``), and the factory the pipeline calls.

One balancer is made per service and lives as long as the process, so a policy can keep
state across requests (a round-robin position, a cached ring). Every policy is safe to
call from many threads and from asyncio at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from .._config import LB_POLICIES, LbPolicy
from ._p2c import LeastRequest, P2CEwma
from ._policy import Balancer
from ._ring_hash import RingHash
from ._round_robin import RoundRobin
from ._weighted_random import WeightedRandom

__all__ = ["make_balancer"]

_POLICIES: Mapping[str, Callable[[], Balancer]] = MappingProxyType(
    {
        "round_robin": RoundRobin,
        "least_request": LeastRequest,
        "p2c_ewma": P2CEwma,
        "random": WeightedRandom,
        "ring_hash": RingHash,
    }
)


def make_balancer(policy: LbPolicy) -> Balancer:
    """A new balancer implementing ``policy``, for one service.

    Raises ``ValueError`` for a name that is not one of ``MESH_LB``'s values.
    """
    try:
        factory = _POLICIES[policy]
    except KeyError:
        expected = ", ".join(LB_POLICIES)
        raise ValueError(
            f"unknown load-balancing policy {policy!r}: expected one of {expected}"
        ) from None
    return factory()
