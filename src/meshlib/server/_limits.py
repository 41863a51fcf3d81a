"""Inbound rate limits: token buckets, one for the whole process and one per calling service.

A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens a second; a request
takes one or is refused with 429 and ``Retry-After``: the whole seconds until a token is
there again, rounded up. The arithmetic is lazy (tokens are topped up from the monotonic
clock when a request arrives), so there is no background thread, and one lock guards the
counter updates only; a check costs a few microseconds.

Per-source buckets are keyed by the caller's verified identity (trust domain, namespace
and service of its mTLS certificate; the datacenter is left out, so a failover from
another datacenter counts as the same caller). A caller without one (``MESH_TLS=off``, or
plaintext in permissive mode) is not trusted to say who it is: headers are never read for
this. All such callers share the one bucket ``unidentified``. At most ``max_sources``
buckets are kept; the least recently used is dropped beyond that (a dropped caller starts
again with a full bucket, which only a mesh with that many services calling one instance
could notice).

Limits are per process: a server with ``--workers 4`` serves up to four times the rate.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from .._config import RateLimit
from ..security import SpiffeId

__all__ = ["UNIDENTIFIED", "RateLimiter", "Refusal", "TokenBucket", "source_key"]

#: The per-source key of callers without a verified identity.
UNIDENTIFIED = "unidentified"


class TokenBucket:
    """One bucket; not thread-safe on its own (``RateLimiter`` locks around it).

    ``now`` is any monotonic clock reading in seconds; the bucket starts full.
    """

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if one was there, else the seconds until one will be."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def give_back(self) -> None:
        """Return a token taken for a request that another bucket then refused."""
        self.tokens = min(self.burst, self.tokens + 1.0)


class Refusal(NamedTuple):
    """Why a request was refused, and when to try again."""

    #: ``global`` or ``source``
    scope: str
    #: whole seconds until a token is there (the ``Retry-After`` value), at least 1
    retry_after: int
    limit: RateLimit


def source_key(peer: SpiffeId | None) -> str:
    """The per-source bucket of a caller: its verified service, or ``unidentified``."""
    if peer is None:
        return UNIDENTIFIED
    return f"{peer.trust_domain}/{peer.namespace}/{peer.service}"


class RateLimiter:
    """The process-wide and per-source buckets of one server; thread-safe."""

    def __init__(
        self,
        overall: RateLimit | None,
        per_source: RateLimit | None,
        *,
        max_sources: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.overall = overall
        self.per_source = per_source
        self.max_sources = max_sources
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        self._global = None if overall is None else TokenBucket(overall.rate, overall.burst, now)
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def active(self) -> bool:
        """Whether any limit is configured."""
        return self.overall is not None or self.per_source is not None

    def check(self, peer: SpiffeId | None) -> Refusal | None:
        """Take a token for a request from ``peer``, or say why not.

        The caller's own bucket is asked first; if the process-wide one then refuses, the
        caller's token is given back, so a refused request never costs a token.
        """
        with self._lock:
            now = self._clock()
            own: TokenBucket | None = None
            if self.per_source is not None:
                own = self._bucket(source_key(peer), self.per_source, now)
                wait = own.take(now)
                if wait:
                    return Refusal("source", _whole_seconds(wait), self.per_source)
            if self._global is not None:
                assert self.overall is not None
                wait = self._global.take(now)
                if wait:
                    if own is not None:
                        own.give_back()
                    return Refusal("global", _whole_seconds(wait), self.overall)
            return None

    def _bucket(self, key: str, limit: RateLimit, now: float) -> TokenBucket:
        sources = self._sources
        bucket = sources.get(key)
        if bucket is None:
            bucket = sources[key] = TokenBucket(limit.rate, limit.burst, now)
            if len(sources) > self.max_sources:
                sources.popitem(last=False)
        else:
            sources.move_to_end(key)
        return bucket


def _whole_seconds(wait: float) -> int:
    # Retry-After takes whole seconds (RFC 9110); rounding down would invite a retry that
    # is refused again. The small epsilon keeps 2.0000000001 (float noise) at 2.
    return max(1, math.ceil(wait - 1e-9))
