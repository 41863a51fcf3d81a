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
from ._endpoint import Endpoint, Snapshot, SnapshotListener

__all__ = ["StaticDiscovery"]


class StaticDiscovery:
    """Discovery from ``{service: (HostPort, ...)}`` (``MeshConfig.static_services``).

    Each endpoint's id is its ``host:port``; its weight is ``HostPort.weight``.
    """

    def __init__(self, services: Mapping[str, tuple[HostPort, ...]]) -> None:
        self._snapshots: Mapping[str, Snapshot] = MappingProxyType(
            {
                service: Snapshot(service, tuple(_endpoint(hp) for hp in hosts), index=1)
                for service, hosts in services.items()
            }
        )

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
        """Accept ``listener``; a static list never changes, so it is never called."""

    def close(self) -> None:
        """Nothing to stop."""


def _endpoint(hp: HostPort) -> Endpoint:
    endpoint = Endpoint(hp.host, hp.port, weight=max(1, hp.weight))
    return replace(endpoint, id=endpoint.address)  # "host:port", IPv6 hosts in brackets
