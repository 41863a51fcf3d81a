"""Discovery from a fixed list: the embedded default when there is no Consul.

``MESH_STATIC_SERVICES`` names every service and its endpoints up front, so every answer is
known at construction: ``snapshot``, ``knows`` and ``wait`` answer at once, nothing runs in
the background, and there is nothing to close. It lets the mesh (balancing, retries,
breakers, telemetry) run in development and tests with no control plane at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType

from .._config import HostPort
from .._endpoint import Endpoint, Snapshot, SnapshotListener

__all__ = ["StaticDiscovery"]


class StaticDiscovery:
    """Discovery from ``{service: (HostPort, ...)}`` (``MeshConfig.static_services``).

    Each endpoint's id is its ``host:port``; its weight is ``HostPort.weight``.
    """

    #: no thread: a forked worker keeps it (and its destinations' state)
    survives_fork = True

    def __init__(
        self,
        services: Mapping[str, tuple[HostPort, ...]],
        extra: Mapping[str, tuple[Endpoint, ...]] | None = None,
    ) -> None:
        self._env = {
            service: tuple(_endpoint(hp) for hp in hosts) for service, hosts in services.items()
        }
        self._listeners: list[SnapshotListener] = []
        self._index = 0
        self._snapshots: Mapping[str, Snapshot] = MappingProxyType({})
        self.update(extra or {})

    def update(self, extra: Mapping[str, tuple[Endpoint, ...]]) -> None:
        """Replace the endpoints from the local config file (they win over the environment's)
        and publish the services whose endpoints changed."""
        self._index += 1
        merged = {**self._env, **extra}
        old = self._snapshots
        self._snapshots = MappingProxyType(
            {s: Snapshot(s, endpoints, self._index) for s, endpoints in merged.items()}
        )
        for service, snapshot in self._snapshots.items():
            previous = old.get(service)
            if previous is None or _shape(previous) != _shape(snapshot):
                for listener in self._listeners:
                    listener(snapshot)

    def snapshot(self, service: str) -> Snapshot | None:
        """The configured endpoints of ``service``, or None if it is not configured."""
        return self._snapshots.get(service)

    def knows(self, service: str) -> bool:
        """Whether ``service`` is configured."""
        return service in self._snapshots

    def wait(self, service: str, timeout: float) -> Snapshot | None:
        """The same as ``snapshot``: a static list has nothing to wait for."""
        return self._snapshots.get(service)

    def subscribe(self, listener: SnapshotListener) -> None:
        """Call ``listener`` when the local config file changes a service's endpoints."""
        self._listeners.append(listener)

    def close(self) -> None:
        """Nothing to stop."""


def _endpoint(hp: HostPort) -> Endpoint:
    endpoint = Endpoint(hp.host, hp.port, weight=max(1, hp.weight))
    return replace(endpoint, id=endpoint.address)  # "host:port", IPv6 hosts in brackets


def _shape(snapshot: Snapshot) -> list[tuple[Endpoint, dict[str, str], tuple[str, ...]]]:
    """What subsets can see of a snapshot (Endpoint equality leaves out meta and tags)."""
    return [(e, dict(e.meta), e.tags) for e in snapshot.endpoints]
