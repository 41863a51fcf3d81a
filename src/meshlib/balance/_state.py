"""The live state of one endpoint: requests in flight, peak-EWMA latency, outlier counters.

One ``EndpointState`` exists per endpoint per service for the life of the process; a new
discovery snapshot keeps the state of endpoints it still lists (by ``Endpoint.key``), so an
ejection or a latency estimate survives a health-check flap elsewhere in the set.

Counters are updated under a small per-endpoint lock (threads may share a client); the
lock is held only for the arithmetic, never across I/O.
"""

from __future__ import annotations

import math
import threading
import time

from ..discovery._endpoint import Endpoint

__all__ = ["EndpointState", "PeakEwma"]


class PeakEwma:
    """Peak-sensitive exponentially weighted moving average of latency (seconds).

    As in Finagle's and Linkerd's balancers: a sample above the average replaces it at once
    (so a slow endpoint is avoided immediately), a lower one is blended in with a weight
    that depends on the time since the last sample (``tau`` is the decay time), and the
    estimate decays towards zero while nothing is observed, so an endpoint that was slow
    gets probed again eventually instead of being starved forever.
    """

    __slots__ = ("_cost", "_stamp", "_tau")

    def __init__(self, tau: float = 10.0) -> None:
        self._tau = tau
        self._cost = 0.0
        self._stamp = time.monotonic()

    def observe(self, rtt: float, now: float | None = None) -> None:
        """Record one latency sample (seconds)."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._stamp, 0.0)
        self._stamp = now
        if rtt > self._cost:
            self._cost = rtt
        else:
            weight = math.exp(-elapsed / self._tau)
            self._cost = self._cost * weight + rtt * (1.0 - weight)

    def cost(self, now: float | None = None) -> float:
        """The current estimate, decayed to ``now`` (does not count as a sample)."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._stamp, 0.0)
        return self._cost * math.exp(-elapsed / self._tau)


class EndpointState:
    """Mutable runtime state of one endpoint. Balancers read it; attempts update it."""

    __slots__ = (
        "_lock",
        "consecutive_errors",
        "ejected_at",
        "ejected_until",
        "ejections",
        "endpoint",
        "ewma",
        "in_flight",
        "outlier_decay_at",
        "refusals",
        "weight",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        #: The endpoint's load-balancing weight (at least 1); a plain slot for speed.
        self.weight = max(endpoint.weight, 1)
        self.in_flight = 0
        self.ewma = PeakEwma()
        #: outlier detection (resilience/_outlier.py owns these)
        self.consecutive_errors = 0
        self.ejected_until = 0.0
        #: when the current ejection began (0.0: not ejected, or its end already reported)
        self.ejected_at = 0.0
        self.ejections = 0
        self.outlier_decay_at = 0.0
        #: refused connections since the last success (each ejects for longer)
        self.refusals = 0
        self._lock = threading.Lock()

    def rebind(self, endpoint: Endpoint) -> None:
        """The same endpoint (same key) with a new weight, address or metadata."""
        self.endpoint = endpoint
        self.weight = max(endpoint.weight, 1)

    def started(self) -> float:
        """Count one more request in flight; returns the start time to pass to ``finished``."""
        with self._lock:
            self.in_flight += 1
        return time.monotonic()

    def finished(self, start: float, *, latency: bool = True, floor: float = 0.0) -> None:
        """Count a request done; if ``latency``, feed its duration to the latency estimate,
        or ``floor`` when that is more (a failed attempt must not look cheap)."""
        now = time.monotonic()
        with self._lock:
            self.in_flight -= 1
            if latency:
                self.ewma.observe(max(now - start, floor), now)

    def load(self, now: float) -> float:
        """Peak-EWMA load: latency estimate x (in flight + 1), Finagle's formula.

        An endpoint with no estimate yet costs 0 when idle (so it gets measured at once)
        and a large penalty when it already has requests in flight.
        """
        cost = self.ewma.cost(now)
        if cost == 0.0 and self.in_flight:
            return _PENALTY + self.in_flight
        return cost * (self.in_flight + 1)

    def __repr__(self) -> str:
        return f"<EndpointState {self.endpoint.key} in_flight={self.in_flight}>"


_PENALTY = float(2**48)
