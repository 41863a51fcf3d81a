"""Load balancing: pick one endpoint of a service for each attempt.

``make_balancer(policy)`` makes the balancer ``MESH_LB`` names: ``p2c_ewma`` (the
default), ``least_request``, ``round_robin``, ``random`` or ``ring_hash``. Each honours the
endpoints' weights and reads their live ``EndpointState`` (requests in flight, peak-EWMA
latency); the caller has already left out ejected endpoints and those a request tried.
"""

from __future__ import annotations

from ._p2c import LeastRequest, P2CEwma
from ._policies import make_balancer
from ._policy import Balancer
from ._ring_hash import RingHash
from ._round_robin import RoundRobin
from ._state import EndpointState, PeakEwma
from ._weighted_random import WeightedRandom

__all__ = [
    "Balancer",
    "EndpointState",
    "LeastRequest",
    "P2CEwma",
    "PeakEwma",
    "RingHash",
    "RoundRobin",
    "WeightedRandom",
    "make_balancer",
]
