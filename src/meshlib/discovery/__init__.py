"""Service discovery: where a service's healthy endpoints come from.

Two sources implement one ``Discovery`` protocol: ``ConsulDiscovery`` (a few blocking
queries on the whole datacenter, on the process's one Consul thread) and
``StaticDiscovery`` (a fixed list from ``MESH_STATIC_SERVICES``, the embedded default).
Both publish immutable ``Snapshot`` objects that the request path reads without waiting;
``make_discovery`` picks the source the configuration asks for.
"""

from __future__ import annotations

from .._config import MeshConfig
from .._endpoint import Discovery, Endpoint, Snapshot, SnapshotListener
from .._exceptions import ConfigError
from ..consul import Engine
from ._consul import ConsulDiscovery
from ._static import StaticDiscovery

__all__ = [
    "ConsulDiscovery",
    "Discovery",
    "Endpoint",
    "Snapshot",
    "SnapshotListener",
    "StaticDiscovery",
    "check_discovery",
    "make_discovery",
]


def check_discovery(config: MeshConfig) -> None:
    """Raise ``ConfigError`` if ``make_discovery(config)`` would (at start-up, before the
    discovery itself starts on the first call out)."""
    if config.discovery == "consul" and config.consul is None:
        raise ConfigError(
            "MESH_DISCOVERY='consul': expected CONSUL_HTTP_ADDR to be set as well "
            "(the address of the local Consul agent), or MESH_DISCOVERY=static"
        )


def make_discovery(config: MeshConfig) -> Discovery:
    """The discovery ``config`` asks for: Consul if ``config.discovery`` is ``"consul"``.

    Otherwise static discovery from ``config.static_services``.
    """
    check_discovery(config)
    if config.discovery == "consul":
        assert config.consul is not None
        return ConsulDiscovery(
            config.consul,
            connect=config.tls == "strict",
            chains=True,
            grace=config.discovery_reset_grace,
            engine=Engine.shared(config.consul),
        )
    return StaticDiscovery(config.static_services)
