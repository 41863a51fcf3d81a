"""Power of two choices: the ``p2c_ewma`` (default) and ``least_request`` policies.

Draw two distinct candidates at random, by weight, and send to the less loaded one. Two
random choices avoid the herding of "always the least loaded" (every client piling onto
the instance that looked idle a moment ago) while bounding queues almost as well as a full
scan, at the cost of two comparisons; that is why Finagle and Linkerd balance this way.

``p2c_ewma`` measures load as Finagle's peak-EWMA (latency estimate x (in flight + 1)):
an instance that turns slow is avoided at once and tried again as its estimate decays.
``least_request`` counts requests in flight only, for backends whose latency says little
about their load (long polls, streams). Both divide load by weight, so a weight-3
instance is asked to carry three times the load of a weight-1 one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from ._state import EndpointState
from ._weighted_random import draw_two

__all__ = ["LeastRequest", "P2CEwma"]


class P2CEwma:
    """Of two weighted random candidates, the one with the lower peak-EWMA load per weight.

    Weight scales load, not traffic: when nothing is in flight, the heavier of two equally
    fast endpoints wins, and shares follow weight once requests overlap.
    """

    __slots__ = ("_rng",)

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def pick(self, candidates: Sequence[EndpointState], hash_key: str | None) -> EndpointState:
        """The less loaded of two candidates; ``hash_key`` is ignored."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = draw_two(candidates, self._rng)
        now = time.monotonic()
        # b.load / b.weight < a.load / a.weight, without dividing; a tie goes to a.
        if b.load(now) * a.weight < a.load(now) * b.weight:
            return b
        return a


class LeastRequest:
    """Of two weighted random candidates, the one with fewer requests in flight per weight.

    Idle endpoints tie at zero and a tie goes to the first candidate, drawn by weight, so
    light traffic is shared by weight too, not sent to the heaviest endpoint every time.
    """

    __slots__ = ("_rng",)

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def pick(self, candidates: Sequence[EndpointState], hash_key: str | None) -> EndpointState:
        """The less busy of two candidates; ``hash_key`` is ignored."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = draw_two(candidates, self._rng)
        # b.in_flight / b.weight < a.in_flight / a.weight, without dividing; a tie goes to a.
        if b.in_flight * a.weight < a.in_flight * b.weight:
            return b
        return a
