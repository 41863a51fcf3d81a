"""The per-service circuit breaker: fail fast while a whole service is down.

States, as in pybreaker and Hystrix: *closed* (requests flow; ``failures`` consecutive
failed requests -- each judged by its final outcome, after retries -- open it), *open*
(every request fails at once with ``CircuitOpen`` for ``reset_timeout`` seconds),
*half-open* (at most ``probes`` requests are let through at once; one success closes the
breaker, one failure re-opens it).

State and the failure counter live in a ``pybreaker.CircuitBreakerStorage`` (in memory by
default; ``pybreaker.CircuitRedisStorage`` shares one breaker across processes). The
state machine itself is written here rather than taken from ``pybreaker.CircuitBreaker``
because that class holds its lock across the protected call, serialising concurrent
requests (measured: 8 threads x 20 ms took 0.81 s instead of 0.10 s), and lets every
concurrent request through in half-open instead of a bounded number of probes
(FINDINGS.md). Here the lock guards only the counter and state updates, never I/O, and
the same object serves threads and asyncio.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import pybreaker

from ._events import EVENTS

__all__ = ["Breaker", "BreakerListener"]

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN

logger = logging.getLogger("meshlib.breaker")

#: Called with (service, old state, new state) on every transition; failsafe.
BreakerListener = Callable[[str, str, str], None]


class Breaker:
    """A sans-IO circuit breaker. ``allow()`` before an attempt, ``record()`` after."""

    def __init__(
        self,
        service: str,
        *,
        failures: int,
        reset_timeout: float,
        probes: int,
        storage: pybreaker.CircuitBreakerStorage | None = None,
    ) -> None:
        self.service = service
        self.failures = failures
        self.reset_timeout = reset_timeout
        self.probes = probes
        self._storage = storage or pybreaker.CircuitMemoryStorage(CLOSED)
        self._probes_out = 0
        self._lock = threading.Lock()
        self.listeners: list[BreakerListener] = []

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` (pybreaker's state names)."""
        state: str = self._storage.state
        if state == OPEN and self._open_for() >= self.reset_timeout:
            return HALF_OPEN
        return state

    def _open_for(self) -> float:
        opened_at = self._storage.opened_at
        if opened_at is None:
            return float("inf")
        return (datetime.now(UTC) - opened_at).total_seconds()

    def allow(self) -> bool | None:
        """May an attempt go now? True: yes; None: yes, as a half-open probe; False: no.

        A caller that got ``None`` must call ``record(..., probe=True)`` exactly once.
        """
        state = self._storage.state
        if state == CLOSED:
            return True
        transition = None
        with self._lock:
            state = self._storage.state
            if state == OPEN:
                if self._open_for() < self.reset_timeout:
                    return False
                self._storage.state = HALF_OPEN
                self._probes_out = 0
                transition = (OPEN, HALF_OPEN)
            if self._storage.state == HALF_OPEN:
                if self._probes_out >= self.probes:
                    verdict: bool | None = False
                else:
                    self._probes_out += 1
                    verdict = None
            else:
                verdict = True
        if transition:
            self._notify(*transition)
        return verdict

    def record(self, failure: bool, *, probe: bool = False) -> None:
        """Record one attempt's outcome (``probe``: it was let through by half-open)."""
        if not failure and not probe and self._storage.counter == 0:
            return  # the hot path: closed and healthy, nothing to update
        transition = None
        with self._lock:
            state = self._storage.state
            if probe:
                self._probes_out = max(self._probes_out - 1, 0)
            if failure:
                self._storage.increment_counter()
                if state == HALF_OPEN or (
                    state == CLOSED and self._storage.counter >= self.failures
                ):
                    self._storage.state = OPEN
                    self._storage.opened_at = datetime.now(UTC)
                    transition = (state, OPEN)
            else:
                self._storage.reset_counter()
                if state == HALF_OPEN and probe:
                    self._storage.state = CLOSED
                    transition = (HALF_OPEN, CLOSED)
        if transition:
            self._notify(*transition)

    def release(self) -> None:
        """A probe that was let through but made no attempt gives its place back."""
        with self._lock:
            self._probes_out = max(self._probes_out - 1, 0)

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 if not open)."""
        if self._storage.state != OPEN:
            return 0.0
        return max(self.reset_timeout - self._open_for(), 0.0)

    def _notify(self, old: str, new: str) -> None:
        self._log(old, new)
        for listener in self.listeners:
            try:
                listener(self.service, old, new)
            except Exception:  # a failing listener must never fail a request
                logger.exception("breaker listener failed")

    def _log(self, old: str, new: str) -> None:
        """One line per transition (rate-limited): what changed and what happens next."""
        name = self.service
        if new == OPEN:
            why = (
                "a half-open probe failed"
                if old == HALF_OPEN
                else f"{self.failures} consecutive requests failed"
            )
            EVENTS.emit(
                logging.WARNING,
                "breaker.open",
                name,
                f"circuit breaker for {name!r} opened ({why}): requests fail fast for "
                f"{self.reset_timeout:g}s, then up to {self.probes} probe(s)",
                previous=old,
                reset_timeout_s=self.reset_timeout,
            )
        elif new == HALF_OPEN:
            EVENTS.emit(
                logging.INFO,
                "breaker.half_open",
                name,
                f"circuit breaker for {name!r} half-open: letting up to {self.probes} "
                "probe(s) through",
                previous=old,
                probes=self.probes,
            )
        else:
            EVENTS.emit(
                logging.INFO,
                "breaker.closed",
                name,
                f"circuit breaker for {name!r} closed: a probe succeeded, requests flow again",
                previous=old,
            )
