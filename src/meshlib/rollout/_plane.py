"""Where a rollout's routing, state and lock live: a ``ControlPlane``.

The controller (``_run``) speaks only to this interface, so the same loop drives a rollout
through Consul (``ConsulPlane``: config entries, KV with check-and-set, a session lock) or
through the embedded default's local config file (``_file.FilePlane``: the same entries in
``MESH_CONFIG_FILE``, the state in a file beside it, an ``flock``).

Each implementation keeps the guarantees the loop relies on:

* ``StateStore.save`` is a check-and-set on the index ``load`` returned, so a write based on
  a stale read (a second writer, an operator's ``pause`` meanwhile) fails instead of undoing
  the other change; ``wait`` returns early when the state changes;
* ``ControllerLock.acquire`` gives one controller per service, and a holder that died
  (``kill -9``) does not keep it;
* the routing writes keep what they do not own (the operator's other routes and entries).
"""

from __future__ import annotations

import threading
from typing import Protocol

from ._consul import ConsulAPI
from ._consul_entries import (
    Match,
    Resolver,
    instances,
    read_resolver,
    read_split,
    remove_route,
    write_route,
    write_split,
)
from ._lock import ControllerLock, Holder
from ._state import RolloutState, StateStore

__all__ = ["ConsulPlane", "ControlPlane", "Lock", "Store"]


class Store(Protocol):
    """One service's rollout state, read and written with check-and-set."""

    def load(self) -> tuple[RolloutState | None, int]:
        """``(state or None, index)``; index 0 when there is none yet."""
        ...

    def wait(self, index: int, timeout: float) -> tuple[RolloutState | None, int]:
        """Like ``load``, but returns early only when the state changes after ``index``."""
        ...

    def save(self, state: RolloutState, cas: int) -> bool:
        """Write ``state`` if the state is still at ``cas`` (0: does not exist yet)."""
        ...


class Lock(Protocol):
    """The exclusive right to drive one service's rollout."""

    #: set when the lock was taken away from under its holder
    lost: threading.Event

    def holder(self) -> Holder | None:
        """The current holder, or None when the lock is free."""
        ...

    def acquire(self) -> Holder | None:
        """Take the lock; on failure return who holds it (and take nothing)."""
        ...

    def release(self) -> None:
        """Give the lock up."""
        ...


class ControlPlane(Protocol):
    """The routing entries, state and lock of rollouts, wherever they live."""

    #: where, for messages: ``Consul at http://...`` or ``the file /etc/mesh.json``
    where: str

    def resolver(self, service: str) -> Resolver:
        """The operator's ``service-resolver``, or ``RolloutError`` saying what is missing."""
        ...

    def split(self, service: str) -> dict[str, int] | None:
        """The ``service-splitter``'s weight per subset, or None without one."""
        ...

    def write_split(self, service: str, stable: str, canary: str, weight: int) -> None:
        """Send ``weight`` percent to ``canary``, the rest to ``stable``."""
        ...

    def write_route(self, service: str, canary: str, match: Match) -> None:
        """Route ``match`` to ``canary``, first, keeping the other routes."""
        ...

    def remove_route(self, service: str, match: Match) -> None:
        """Take the canary route out again."""
        ...

    def instances(self, resolver: Resolver, subset: str) -> list[str]:
        """Where each instance ``subset`` selects serves its metrics: ``host:port``."""
        ...

    def store(self, service: str) -> Store:
        """The state store of ``service``'s rollout."""
        ...

    def lock(self, service: str) -> Lock:
        """The controller lock of ``service``."""
        ...


class ConsulPlane:
    """``ControlPlane`` over Consul: config entries, KV and a session lock."""

    def __init__(self, api: ConsulAPI) -> None:
        self.api = api
        self.where = f"Consul at {api.address}"

    def resolver(self, service: str) -> Resolver:
        """See ``ControlPlane``."""
        return read_resolver(self.api, service)

    def split(self, service: str) -> dict[str, int] | None:
        """See ``ControlPlane``."""
        return read_split(self.api, service)

    def write_split(self, service: str, stable: str, canary: str, weight: int) -> None:
        """See ``ControlPlane``."""
        write_split(self.api, service, stable, canary, weight)

    def write_route(self, service: str, canary: str, match: Match) -> None:
        """See ``ControlPlane``."""
        write_route(self.api, service, canary, match)

    def remove_route(self, service: str, match: Match) -> None:
        """See ``ControlPlane``."""
        remove_route(self.api, service, match)

    def instances(self, resolver: Resolver, subset: str) -> list[str]:
        """See ``ControlPlane``."""
        return instances(self.api, resolver, subset)

    def store(self, service: str) -> StateStore:
        """See ``ControlPlane``."""
        return StateStore(self.api, service)

    def lock(self, service: str) -> ControllerLock:
        """See ``ControlPlane``."""
        return ControllerLock(self.api, service)
