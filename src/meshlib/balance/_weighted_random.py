"""Weighted random choice: the ``random`` policy, and the draws the other policies build on.

Every policy honours the per-instance weights Consul reports, so every draw here is
weighted: ``draw`` picks one candidate with probability proportional to its weight, and
``draw_two`` picks two distinct ones, which power of two choices needs. The random source
is an injected ``random.Random`` so tests can seed it; its ``random()`` is safe to call
from many threads at once, so nothing here takes a lock.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

from ._state import EndpointState

__all__ = ["WeightedRandom", "draw", "draw_two"]


class WeightedRandom:
    """Send each request to a random candidate, chosen in proportion to its weight.

    Stateless and cheap. It evens out load only on average, so prefer ``p2c_ewma``
    unless there is a reason not to look at load at all.
    """

    __slots__ = ("_rng",)

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def pick(self, candidates: Sequence[EndpointState], hash_key: str | None) -> EndpointState:
        """A weighted random candidate; ``hash_key`` is ignored."""
        return draw(candidates, self._rng)


def draw(candidates: Sequence[EndpointState], rng: random.Random) -> EndpointState:
    """One candidate, with probability proportional to its weight."""
    if len(candidates) == 1:
        return candidates[0]
    bounds = list(accumulate([state.weight for state in candidates]))
    return candidates[bisect_right(bounds, rng.random() * bounds[-1])]


def draw_two(
    candidates: Sequence[EndpointState], rng: random.Random
) -> tuple[EndpointState, EndpointState]:
    """Two distinct candidates (there must be at least two): one by weight, then one of the rest.

    Ties between the two should go to the first: it was drawn by weight from all the
    candidates, so breaking ties that way keeps idle endpoints busy in proportion to weight.
    """
    # Candidate i owns [bounds[i - 1], bounds[i]) of [0, total). random() < 1, so a point
    # below total never lands past the last bound, even after rounding.
    bounds = list(accumulate([state.weight for state in candidates]))
    total = bounds[-1]
    first = bisect_right(bounds, rng.random() * total)
    start, end = (bounds[first - 1] if first else 0), bounds[first]
    # The second point is drawn from the total without the first's share, then stepped over it.
    point = rng.random() * (total - end + start)
    second = bisect_right(bounds, point if point < start else point + end - start)
    return candidates[first], candidates[min(second, len(bounds) - 1)]
