"""The live state of one endpoint: requests in flight, peak-EWMA latency, outlier counters.

One ``EndpointState`` exists per endpoint per service for the life of the process; a new
discovery snapshot keeps the state of endpoints it still lists (by ``Endpoint.key``), so an
ejection or a latency estimate survives a health-check flap elsewhere in the set.

**Slow start** (``MESH_SLOW_START``, Envoy's ``slow_start_window``). Peak-EWMA holds a slow
sample at once and forgets it with a 10 s time constant, so an instance whose first answers
were slow (a cold start: imports, caches, a JIT) went unused for tens of seconds: 1.5 s
against peers at 1 ms took ~70 s to decay. For ``window`` seconds after an endpoint joins
(``begin_slow_start``: it is new to a service already in use, passes its health checks
again, or its ejection ends), its estimate is a plain EWMA with a time constant of a tenth
of the window, no peak hold, so a cold start is forgiven within seconds; once the window
is over, peak-EWMA judges it as before, so a truly slow instance still loses its traffic.
A joining endpoint seeded with its peers' typical (median) cost also *ramps*: its load is
divided by Envoy's time factor ``max(10%, elapsed / window)`` (aggression 1), so it is
asked for a growing share instead of its full share at once.

Counters are updated under a small per-endpoint lock (threads may share a client); the
lock is held only for the arithmetic, never across I/O.
"""

from __future__ import annotations

import math
import threading
import time

from .._endpoint import Endpoint

__all__ = ["EndpointState", "PeakEwma"]

#: peak-EWMA's decay time (seconds), as Finagle's and Linkerd's
TAU = 10.0
#: the least share a ramping endpoint is asked for (Envoy's ``min_weight_percent`` default)
MIN_SHARE = 0.1


class PeakEwma:
    """Peak-sensitive exponentially weighted moving average of latency (seconds).

    As in Finagle's and Linkerd's balancers: a sample above the average replaces it at once
    (so a slow endpoint is avoided immediately), a lower one is blended in with a weight
    that depends on the time since the last sample (``tau`` is the decay time), and the
    estimate decays towards zero while nothing is observed, so an endpoint that was slow
    gets probed again eventually instead of being starved forever.
    """

    __slots__ = ("_cost", "_stamp", "_tau", "peak")

    def __init__(
        self, tau: float = TAU, *, seed: float = 0.0, peak: bool = True, now: float | None = None
    ) -> None:
        self._tau = tau
        self._cost = seed
        self._stamp = time.monotonic() if now is None else now
        #: whether a sample above the estimate replaces it (off while slow-starting)
        self.peak = peak

    def settle(self, now: float) -> None:
        """End slow start: peak-sensitive again, with the normal time constant.

        The decay so far is taken at the slow-start time constant first: applied at the
        normal one, the time since the last sample would bring back most of a cold
        start's forgiven estimate (1.5 s decayed to 1 ms came back as 0.75 s).
        """
        self._cost = self.cost(now)
        self._stamp = now
        self._tau = TAU
        self.peak = True

    def observe(self, rtt: float, now: float | None = None, *, hold: bool = False) -> None:
        """Record one latency sample (seconds); ``hold``: peak-sensitive even while not."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._stamp, 0.0)
        self._stamp = now
        # an unmeasured estimate takes its first sample whole, peak or not: blended into
        # 0 it would make a readmitted endpoint look near-free (and drew all traffic)
        if (rtt > self._cost and (self.peak or hold)) or self._cost == 0.0:
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
        "ramp_until",
        "refusals",
        "warm_from",
        "warm_until",
        "weight",
        "window",
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
        #: slow start: forgiving from ``warm_from`` until ``warm_until`` (0.0: not warming),
        #: its load ramped until ``ramp_until`` (0.0: not ramped), over ``window`` seconds
        self.warm_from = 0.0
        self.warm_until = 0.0
        self.ramp_until = 0.0
        self.window = 0.0
        self._lock = threading.Lock()

    def begin_slow_start(self, start: float, window: float, seed: float | None = None) -> None:
        """Enter slow start at ``start`` for ``window`` seconds (0: no slow start).

        Its latency is measured afresh, forgivingly (see the module docstring). With a
        ``seed`` (its peers' typical cost) the estimate starts there and the endpoint's load
        ramps over the window; without one it starts at 0, so it is probed first.
        """
        if window > 0:
            ewma = PeakEwma(window / 10, seed=seed or 0.0, peak=False, now=start)
        else:
            ewma = PeakEwma()
        with self._lock:
            self.ewma = ewma
            if window <= 0:
                self.warm_until = self.ramp_until = 0.0
                return
            self.window = window
            self.warm_from = start
            self.warm_until = start + window
            self.ramp_until = self.warm_until if seed else 0.0

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
        or ``floor`` when that is more (a failed attempt must not look cheap: its floor is
        held as a peak even in slow start)."""
        now = time.monotonic()
        with self._lock:
            self.in_flight -= 1
            if self.warm_until and now >= self.warm_until:  # its slow start is over
                self.warm_until = 0.0
                self.ewma.settle(now)
            if latency:
                self.ewma.observe(max(now - start, floor), now, hold=floor > 0.0)

    def load(self, now: float) -> float:
        """Peak-EWMA load: latency estimate x (in flight + 1), Finagle's formula.

        An endpoint with no estimate yet costs 0 when idle (so it gets measured at once)
        and a large penalty when it already has requests in flight. A ramping endpoint
        (slow start) divides its load by the share of the window elapsed, at least 10%.
        """
        cost = self.ewma.cost(now)
        if cost == 0.0 and self.in_flight:
            return _PENALTY + self.in_flight
        if self.ramp_until > now:
            return (
                cost * (self.in_flight + 1) / max(MIN_SHARE, (now - self.warm_from) / self.window)
            )
        return cost * (self.in_flight + 1)

    def __repr__(self) -> str:
        return f"<EndpointState {self.endpoint.key} in_flight={self.in_flight}>"


_PENALTY = float(2**48)
