"""Outlier ejection: stop sending to an endpoint that keeps failing, for a growing while.

Like Envoy's ``consecutive_5xx`` / ``consecutive_gateway_failure`` detection: after
``consecutive_errors`` failed attempts in a row (5xx, connect failures, resets, timeouts)
an endpoint is ejected for ``ejection_time`` x the number of times it has been ejected
(capped at 10x), and comes back by itself when that time is up. At most
``max_ejection`` of a service's endpoints are out at once (but always at least one may
be), so a bad deploy cannot eject the whole set. The ejection multiplier decays by one
per ejection period of good behaviour.

A refused connection is news, not a count: nothing listens there (the process died, or has
not started yet), so ``refused`` ejects the endpoint at once, whatever the share already
out, for ``REFUSED_EJECTION`` x the refusals in a row, capped at ``REFUSED_EJECTION_MAX``.
Short, because a restarted instance must get its share back within a second or two: when
the time is up, the next attempt there is the probe (retried elsewhere if it is refused
again, so no request fails), and a success clears the count. Counting five refusals first
sent the first attempt of every request to a killed instance of two until it was ejected;
a fixed latency penalty instead starved the restarted instance for ~80 s.

An ejected endpoint comes back in slow start (``EndpointState.begin_slow_start``, without a
ramp): probed first as before, so its ejection can end or grow at once, and its first
answers forgiven if they are slow, as a restarted process's often are.

State lives on each ``EndpointState``; the detector is stateless apart from its settings,
so swapping settings is swapping the detector. An ejection ends by time alone; the first
attempt after it learns of the readmission (``readmitted``), so the pipeline can log it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..balance._state import EndpointState

__all__ = ["OutlierDetector"]

_MAX_MULTIPLIER = 10
#: Ejection after one refused connection; doubled after a second in a row, at most the max.
REFUSED_EJECTION = 0.5
REFUSED_EJECTION_MAX = 1.0


class OutlierDetector:
    """Decides ejections from attempt outcomes."""

    __slots__ = ("consecutive_errors", "ejection_time", "max_ejection", "slow_start")

    def __init__(
        self,
        consecutive_errors: int,
        ejection_time: float,
        max_ejection: float,
        slow_start: float = 0.0,
    ) -> None:
        self.consecutive_errors = consecutive_errors
        self.ejection_time = ejection_time
        self.max_ejection = max_ejection
        #: the slow-start window (seconds) a readmitted endpoint begins with; 0: none
        self.slow_start = slow_start

    def success(self, state: EndpointState, now: float, started: float = 0.0) -> None:
        """An attempt on ``state`` (sent at ``started``) went well.

        An ejected endpoint that answered well an attempt sent to it *while* ejected
        (balance used it anyway: panic mode, too few left) is back: its ejection ends now
        rather than when its time is up. An attempt sent before the ejection proves nothing.
        """
        if state.ejected_until > now and started >= state.ejected_at > 0:
            state.ejected_until = now
        if state.consecutive_errors:
            state.consecutive_errors = 0
        if state.refusals:
            state.refusals = 0
        if state.ejections and now >= state.outlier_decay_at:
            state.ejections -= 1
            state.outlier_decay_at = now + self.ejection_time

    @staticmethod
    def readmitted(state: EndpointState, now: float) -> float | None:
        """If ``state`` was ejected and its ejection is over, the seconds it lasted (once per
        ejection: the first attempt after it reports the readmission); else None."""
        if not state.ejected_at or now < state.ejected_until:
            return None
        lasted = state.ejected_until - state.ejected_at
        state.ejected_at = 0.0
        return lasted

    def failure(self, state: EndpointState, now: float, endpoints: Sequence[EndpointState]) -> bool:
        """An attempt on ``state`` failed; returns True if that ejected it."""
        state.consecutive_errors += 1
        if state.consecutive_errors < self.consecutive_errors or state.ejected_until > now:
            return False
        ejected = sum(1 for s in endpoints if s.ejected_until > now)
        allowed = max(1, math.floor(self.max_ejection * len(endpoints)))
        if ejected >= allowed:
            return False
        state.ejections = min(state.ejections + 1, _MAX_MULTIPLIER)
        state.ejected_until = now + self.ejection_time * state.ejections
        state.ejected_at = now
        state.outlier_decay_at = state.ejected_until + self.ejection_time
        state.consecutive_errors = 0
        # readmitted, it is measured afresh (and probed first), not judged by the past
        state.begin_slow_start(state.ejected_until, self.slow_start)
        return True

    def refused(self, state: EndpointState, now: float) -> bool:
        """A connection to ``state`` was refused: eject it now, briefly; returns True.

        Not bound by ``max_ejection``: the cap protects endpoints that answer (a bad deploy
        must not empty the set), and one that refuses connections answers nothing. Panic
        mode still uses every endpoint when too few remain.
        """
        state.refusals += 1
        state.ejected_until = now + min(REFUSED_EJECTION * state.refusals, REFUSED_EJECTION_MAX)
        state.ejected_at = now
        state.consecutive_errors = 0
        # readmitted, it is measured afresh (and probed first)
        state.begin_slow_start(state.ejected_until, self.slow_start)
        return True
