"""What discovery produces: endpoints, immutable snapshots of them, and the protocol.

Discovery runs in the background and publishes a new ``Snapshot`` per service whenever
its instances or their health change; the request path only ever reads the latest
snapshot (an attribute read), so it never waits on Consul.

A module of the bottom layer: discovery produces these values, and the local config file's
reader (``routing/_local.py``) and the balancer read them, without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

__all__ = ["Discovery", "Endpoint", "Snapshot"]

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a service, as discovery reports it."""

    host: str
    port: int
    weight: int = 1
    #: Stable identity: Consul's service ID, or ``host:port`` for static endpoints.
    id: str = ""
    node: str = ""
    meta: Mapping[str, str] = field(default_factory=lambda: _EMPTY, compare=False)
    tags: tuple[str, ...] = field(default=(), compare=False)
    #: Consul: a check of the instance or its node warns, none is critical. Healthy, at
    #: ``Weights.Warning``, unless the target's subset has ``OnlyPassing``.
    warning: bool = False
    #: ``host:port`` (IPv6 hosts in brackets); computed once.
    address: str = field(init=False, compare=False, repr=False)
    #: The identity that carries per-endpoint state across snapshots: ``id`` or ``address``.
    key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        address = f"{host}:{self.port}"
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "key", self.id or address)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The endpoints of one service at one moment. Never mutated; replaced."""

    service: str
    #: The healthy instances: the ones requests go to.
    endpoints: tuple[Endpoint, ...]
    #: Consul's ``X-Consul-Index`` for this answer, or a counter for static discovery.
    index: int = 0
    #: Instances discovery lists as unhealthy (a critical check, for Consul). Requests reach them
    #: only in panic mode, when too few healthy ones are left (``ServiceState.candidates``),
    #: as Envoy does with the unhealthy endpoints Consul gives it.
    unhealthy: tuple[Endpoint, ...] = ()

    def only_passing(self) -> Snapshot:
        """This snapshot as a resolver subset with ``OnlyPassing`` sees it: instances whose
        checks warn (``Endpoint.warning``) are unhealthy too, as Consul tells Envoy."""
        if not any(e.warning for e in self.endpoints):
            return self
        return Snapshot(
            self.service,
            tuple(e for e in self.endpoints if not e.warning),
            self.index,
            (*self.unhealthy, *(e for e in self.endpoints if e.warning)),
        )


SnapshotListener = Callable[[Snapshot], None]


class Discovery(Protocol):
    """A source of snapshots. Implementations: static (from config) and Consul."""

    #: Whether a process forked from one using it may go on using it: True when it runs no
    #: thread of its own (a thread stays behind in the parent at a fork).
    survives_fork: bool

    def snapshot(self, service: str) -> Snapshot | None:
        """The latest snapshot of ``service``; ``None`` if it is not known (yet). Never blocks."""

    def knows(self, service: str) -> bool | None:
        """Whether ``service`` exists: True, False, or None while that is not known yet."""

    def wait(self, service: str, timeout: float) -> Snapshot | None:
        """Block up to ``timeout`` seconds for the first snapshot of ``service``.

        Called at most once per service, on the first request to it; returns ``None``
        if the service does not exist or discovery could not say in time.
        """

    def subscribe(self, listener: SnapshotListener) -> None:
        """Call ``listener`` (from the discovery thread) with every new snapshot."""

    def close(self) -> None:
        """Stop background work and release connections."""
