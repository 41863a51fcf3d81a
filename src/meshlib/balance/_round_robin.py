"""Smooth weighted round robin (``round_robin``), as nginx does it.

Each pick adds every candidate's weight to its running "current" value, sends to the
candidate with the highest current and takes the round's total weight off the winner.
Shares are exact (weights 1, 2, 3 get exactly 100, 200 and 300 of 600 picks) and spread
out (C B A C B C, never C C C B B A), so a heavy endpoint is not sent bursts. Exactness
is the point of this policy: people choose round robin because it is predictable.

Current values are kept per endpoint, so they survive candidate lists that differ from
call to call: an ejected or already-tried endpoint simply sits a round out, as nginx skips
its failed peers. Values not touched for a whole generation of picks are forgotten, so
endpoints that left the service do not pile up.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ._state import EndpointState

__all__ = ["RoundRobin"]

_GENERATION = 10_000
"""Picks per generation: a value not touched in one whole generation is dropped."""


class RoundRobin:
    """Smooth weighted round robin: exact shares by weight, interleaved.

    Current values are keyed by the ``EndpointState`` itself, which stands for one
    ``Endpoint.key`` for as long as the service lists it (and is much cheaper to hash
    than a freshly formatted key).
    """

    __slots__ = ("_current", "_lock", "_picks", "_previous")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[EndpointState, int] = {}
        self._previous: dict[EndpointState, int] = {}
        self._picks = 0

    def pick(self, candidates: Sequence[EndpointState], hash_key: str | None) -> EndpointState:
        """The next candidate in smooth weighted order; ``hash_key`` is ignored."""
        if len(candidates) == 1:
            return candidates[0]  # a round of one leaves every current value as it was
        with self._lock:
            current, previous = self._current, self._previous
            total = best_value = 0
            best = candidates[0]
            for index, state in enumerate(candidates):
                # Every candidate gains its weight: a value last touched in the previous
                # generation is carried over, a new endpoint starts from 0 ...
                value = current.get(state)
                if value is None:
                    value = previous.pop(state, 0)
                weight = state.weight
                value += weight
                current[state] = value
                total += weight
                if index == 0 or value > best_value:
                    best, best_value = state, value
            # ... and the first highest (as nginx) wins and pays for the round.
            current[best] = best_value - total
            self._picks += 1
            if self._picks == _GENERATION:
                self._picks = 0
                self._previous, self._current = current, {}
        return best
