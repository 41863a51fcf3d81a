"""Pending requests: Envoy's ``max_connections`` and ``max_pending_requests``, sans-IO.

Consul's ``service-defaults`` ``Limits.MaxConnections`` / ``MaxPendingRequests``
(routing/_upstream.py). On HTTP/1.1 a connection carries one request at a time, so the
connections in use to a destination are its attempts in flight. A request that finds
``max_connections`` of them busy is *pending*: it waits for one to end. One that finds
``max_pending`` requests already waiting is refused at once (Envoy's "pending overflow",
a 503 flagged ``UO``): failing fast beats a queue that only grows.

``PendingRequests.enter`` decides (``CircuitOpen`` on overflow) and, when the request must
wait, counts it and returns a ``Ticket``; the transports (sync and async) poll
``Ticket.ready`` with their own sleep and call ``Ticket.leave`` in a ``finally``. Polling,
not a wake-up: a slot frees when an attempt ends on any thread or event loop, and one shared
condition cannot wake both; at ``POLL`` seconds a waiter adds at most that much latency,
and only while the limit is reached.
A wait that outlasts ``max_wait`` (the destination's attempt timeout) gives up, as Envoy's
pending requests end with the route's timeout. Counts are a check, not a reservation, as
Envoy's circuit breakers are: concurrent requests may overshoot by a few.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

from .._exceptions import CircuitOpen

__all__ = ["POLL", "PendingRequests", "Ticket"]

#: How often a pending request looks for a free connection (seconds).
POLL = 0.002


class Ticket:
    """One pending request's place in the queue of its destination."""

    __slots__ = ("_active", "_left", "_limit", "_owner", "_request", "_service", "_until")

    def __init__(
        self,
        owner: PendingRequests,
        service: str,
        request: httpx.Request,
        limit: int,
        active: Callable[[], int],
        max_wait: float,
    ) -> None:
        self._owner = owner
        self._service = service
        self._request = request
        self._limit = limit
        self._active = active
        self._until = time.monotonic() + max_wait
        self._left = False

    def ready(self) -> bool:
        """True when a connection is free; ``CircuitOpen`` once the wait is over."""
        if self._active() < self._limit:
            return True
        if time.monotonic() >= self._until:
            raise CircuitOpen(
                f"service {self._service!r}: no connection of the {self._limit} its "
                "service-defaults UpstreamConfig Limits.MaxConnections allows came free "
                "within the attempt timeout",
                service=self._service,
                request=self._request,
            )
        return False

    def leave(self) -> None:
        """No longer pending (it got a connection, gave up, or failed): once."""
        if not self._left:
            self._left = True
            self._owner._leave(self._service)


class PendingRequests:
    """The requests waiting for a connection, per destination service."""

    def __init__(self) -> None:
        self._waiting: dict[str, int] = {}
        self._lock = threading.Lock()

    def waiting(self, service: str) -> int:
        """How many requests to ``service`` wait for a connection now."""
        return self._waiting.get(service, 0)

    def enter(
        self,
        service: str,
        request: httpx.Request,
        max_connections: int,
        max_pending: int,
        active: Callable[[], int],
        max_wait: float,
    ) -> Ticket | None:
        """None: a connection is free, go. A ``Ticket``: wait (poll ``ready``).

        ``CircuitOpen`` when ``max_pending`` requests already wait (nothing is counted).
        """
        if active() < max_connections:
            return None
        with self._lock:
            waiting = self._waiting.get(service, 0)
            if waiting >= max_pending:
                raise CircuitOpen(
                    f"service {service!r}: all {max_connections} connections busy and "
                    f"{waiting} requests pending, the most its service-defaults "
                    "UpstreamConfig Limits.MaxPendingRequests allows",
                    service=service,
                    request=request,
                )
            self._waiting[service] = waiting + 1
        return Ticket(self, service, request, max_connections, active, max_wait)

    def _leave(self, service: str) -> None:
        with self._lock:
            left = self._waiting.get(service, 1) - 1
            if left > 0:
                self._waiting[service] = left
            else:
                self._waiting.pop(service, None)
