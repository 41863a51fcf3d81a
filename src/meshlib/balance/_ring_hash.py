"""Consistent hashing (``ring_hash``): requests with the same key go to the same endpoint.

For caches and sticky sessions: the value of a header or cookie (``MESH_LB_HASH_ON``) is
hashed onto a Ketama-style ring of virtual nodes, 160 per unit of weight, and the request
goes to the owner of the first node at or after that point. An endpoint's nodes depend
only on its own key and weight, so adding or removing one moves only the keys it gains or
loses; and the hash is blake2b, not Python's salted ``hash()``, so every process and every
restart agree.

The caller leaves ejected and already-tried endpoints out of ``candidates``. Rather than
build a ring for each such subset, the lookup walks on past nodes of endpoints that are not
candidates: a key goes to its own endpoint whenever that endpoint is a candidate, and to
the next candidate round the ring when it is not. The ring is rebuilt only when a candidate
is not on it or its weight changed. (Rings are capped at a few thousand nodes: past 32
units of weight each unit gets fewer, so a rebuild for a changed set may then move a few
more keys than the minimum.) A request without a key is balanced by weighted random.
"""

from __future__ import annotations

import random
import struct
from bisect import bisect_left
from collections.abc import Sequence
from hashlib import blake2b

from ._state import EndpointState
from ._weighted_random import draw

__all__ = ["RingHash"]

_NODES_PER_WEIGHT = 160
_MAX_NODES = 32 * _NODES_PER_WEIGHT
"""Past this many nodes, fewer per weight (at least one per endpoint): 32 unit-weight
endpoints still get the full 160 each."""


def _hash(text: str) -> int:
    """A point on the ring: 64 bits of blake2b, the same in every process."""
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "big")


def _points(key: str, count: int) -> list[int]:
    """The first ``count`` ring positions of ``key``: eight per 64-byte blake2b digest (as
    Ketama takes four per MD5), so growing a weight only adds positions."""
    points: list[int] = []
    for block in range((count + 7) // 8):
        points.extend(_EIGHT_POINTS(blake2b(f"{key}-{block}".encode(), digest_size=64).digest()))
    del points[count:]
    return points


_EIGHT_POINTS = struct.Struct(">8Q").unpack


class _Ring:
    """Node positions in ring order, each node's owner, and the endpoints it was built from."""

    __slots__ = ("endpoints", "owners", "positions")

    def __init__(self, candidates: Sequence[EndpointState]) -> None:
        self.endpoints = {state: state.endpoint for state in candidates}
        states = list(self.endpoints)
        total = sum(endpoint.weight for endpoint in self.endpoints.values())
        per_weight = min(_NODES_PER_WEIGHT, _MAX_NODES / total)
        nodes: list[tuple[int, str, int]] = []
        for index, endpoint in enumerate(self.endpoints.values()):
            key, count = endpoint.key, max(1, round(endpoint.weight * per_weight))
            nodes.extend((position, key, index) for position in _points(key, count))
        nodes.sort()  # by position; the key settles a (2**-64) tie the same way everywhere
        self.positions = [position for position, _, _ in nodes]
        self.owners = [states[index] for _, _, index in nodes]


class RingHash:
    """Consistent hashing of ``hash_key`` onto a ring of the candidates, by weight."""

    __slots__ = ("_ring", "_rng")

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._ring: _Ring | None = None

    def pick(self, candidates: Sequence[EndpointState], hash_key: str | None) -> EndpointState:
        """The candidate owning ``hash_key``; weighted random when there is no key."""
        if hash_key is None:
            return draw(candidates, self._rng)
        if len(candidates) == 1:
            return candidates[0]
        ring = self._ring
        if ring is None or list(map(ring.endpoints.get, candidates)) != [
            state.endpoint for state in candidates
        ]:
            # A new endpoint, or a new weight: a few milliseconds, once per change of the
            # set. Threads racing here each build one and the last is kept (below the cap
            # on nodes, rings of the same endpoints are identical).
            ring = self._ring = _Ring(candidates)
        owners = ring.owners
        index = bisect_left(ring.positions, _hash(hash_key))
        wanted = set(candidates)
        if len(wanted) == len(ring.endpoints):  # every node on the ring is a candidate's
            return owners[index if index < len(owners) else 0]
        while True:  # ends: every candidate has nodes on the ring
            if index == len(owners):
                index = 0
            if owners[index] in wanted:
                return owners[index]
            index += 1
