"""The live state of one destination service: endpoints and the policies that act on them.

A ``ServiceState`` exists per service the process has called. Discovery replaces its
endpoint tuple when a new snapshot arrives (a pointer swap; per-endpoint state carries
over by ``Endpoint.key``), and the request path reads that tuple without a lock. Policy
objects (balancer, budget, breaker, outlier detector) hang off it, so applying new
settings for a service is replacing these attributes.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Collection, Sequence

from ._config import ServicePolicy
from .balance import Balancer, EndpointState, make_balancer
from .discovery import Endpoint, Snapshot
from .resilience._breaker import Breaker
from .resilience._budget import RetryBudget
from .resilience._outlier import OutlierDetector

__all__ = ["ServiceState"]


class ServiceState:
    """Endpoints of one service plus its balancer, retry budget, breaker and ejection."""

    def __init__(self, name: str, policy: ServicePolicy) -> None:
        self.name = name
        self.endpoints: tuple[EndpointState, ...] = ()
        #: instances whose health checks fail: used only in panic mode (``candidates``)
        self.unhealthy: tuple[EndpointState, ...] = ()
        self.snapshot: Snapshot | None = None
        self._update_lock = threading.Lock()
        self.apply_policy(policy)

    def apply_policy(self, policy: ServicePolicy) -> None:
        """Use ``policy`` from now on (each part is replaced by one assignment)."""
        self.policy = policy
        self.balancer: Balancer = make_balancer(policy.lb)
        self.budget = RetryBudget(policy.retry_budget, policy.retry_min_per_second)
        self.breaker = Breaker(
            self.name,
            failures=policy.breaker_failures,
            reset_timeout=policy.breaker_reset,
            probes=policy.breaker_probes,
        )
        self.outlier = OutlierDetector(
            policy.outlier_consecutive_errors,
            policy.outlier_ejection_time,
            policy.outlier_max_ejection,
            policy.slow_start,
        )

    def update(self, snapshot: Snapshot) -> None:
        """Adopt a new snapshot, keeping the runtime state of endpoints still listed."""
        with self._update_lock:
            old = {state.endpoint.key: state for state in (*self.endpoints, *self.unhealthy)}
            was_healthy = {state.endpoint.key for state in self.endpoints}
            now = time.monotonic()
            typical = _typical_cost(self.endpoints, now) if self.policy.slow_start > 0 else 0.0

            def states(endpoints: tuple[Endpoint, ...], joining: bool) -> tuple[EndpointState, ...]:
                found = []
                for endpoint in endpoints:
                    state = old.get(endpoint.key)
                    if state is None:
                        state = EndpointState(endpoint)
                    elif state.endpoint != endpoint:
                        state.rebind(endpoint)  # weight or address changed; keep the stats
                    if joining and typical and endpoint.key not in was_healthy:
                        # new, or healthy again: starts at its peers' cost and ramps up
                        state.begin_slow_start(now, self.policy.slow_start, typical)
                    found.append(state)
                return tuple(found)

            self.endpoints = states(snapshot.endpoints, joining=True)
            self.unhealthy = states(snapshot.unhealthy, joining=False)
            self.snapshot = snapshot

    def routable(self) -> bool:
        """Whether an attempt may start: a healthy instance, or panic mode's unhealthy ones."""
        return bool(self.endpoints or self._last_resort())

    def _last_resort(self) -> tuple[EndpointState, ...]:
        """The unhealthy instances panic mode may use: none while it is off (threshold 0)."""
        return self.unhealthy if self.policy.panic_threshold > 0 else ()

    def candidates(
        self, now: float, tried: Collection[str]
    ) -> list[EndpointState] | tuple[EndpointState, ...]:
        """Endpoints an attempt may use: not ejected, preferably not tried by this request.

        When fewer than ``panic_threshold`` of all the instances are available (healthy and
        not ejected), all of them are used, the unhealthy ones too (Envoy's panic mode):
        spreading load over a partly failing set beats overloading the few left, and a
        burst of failed health checks (a slow health endpoint, a starved checker) must not
        empty the service. ``tried`` is only a preference: when every candidate was tried,
        they are all candidates again.
        """
        endpoints = self.endpoints
        available = [s for s in endpoints if s.ejected_until <= now]
        unhealthy = self._last_resort()
        total = len(endpoints) + len(unhealthy)
        if not available or len(available) < self.policy.panic_threshold * total:
            available = [*endpoints, *unhealthy]
        if tried:
            fresh = [s for s in available if s.endpoint.key not in tried]
            if fresh:
                return fresh
        return available


def _typical_cost(endpoints: Sequence[EndpointState], now: float) -> float:
    """The median latency estimate of the endpoints that have one (0.0: none has)."""
    costs = [cost for state in endpoints if (cost := state.ewma.cost(now)) > 0.0]
    return statistics.median(costs) if costs else 0.0
