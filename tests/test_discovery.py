"""Static discovery and the choice of discovery source (no Consul needed)."""

from __future__ import annotations

import time
from types import MappingProxyType

import pytest

from meshlib import ConfigError
from meshlib._config import ConsulSettings, HostPort, MeshConfig, load_config
from meshlib.discovery import (
    ConsulDiscovery,
    Discovery,
    Endpoint,
    Snapshot,
    StaticDiscovery,
    make_discovery,
)


def static(**services: tuple[HostPort, ...]) -> StaticDiscovery:
    return StaticDiscovery(MappingProxyType(services))


def test_static_snapshot_lists_configured_endpoints_with_ids_and_weights() -> None:
    discovery = static(weather=(HostPort("10.0.0.1", 8001), HostPort("10.0.0.2", 8002, 3)))

    snapshot = discovery.snapshot("weather")

    assert snapshot == Snapshot(
        "weather",
        (
            Endpoint("10.0.0.1", 8001, 1, id="10.0.0.1:8001"),
            Endpoint("10.0.0.2", 8002, 3, id="10.0.0.2:8002"),
        ),
        index=1,
    )


def test_static_ipv6_endpoint_id_is_bracketed() -> None:
    discovery = static(geo=(HostPort("::1", 9001, 2),))

    snapshot = discovery.snapshot("geo")

    assert snapshot is not None
    assert snapshot.endpoints[0].id == "[::1]:9001"
    assert snapshot.endpoints[0].key == "[::1]:9001"


def test_static_knows_configured_services_only() -> None:
    discovery = static(weather=(HostPort("10.0.0.1", 8001),))

    assert discovery.knows("weather") is True
    assert discovery.knows("geo") is False
    assert discovery.snapshot("geo") is None


def test_static_wait_answers_at_once() -> None:
    discovery = static(weather=(HostPort("10.0.0.1", 8001),))

    started = time.monotonic()
    found = discovery.wait("weather", timeout=5.0)
    missing = discovery.wait("geo", timeout=5.0)

    assert time.monotonic() - started < 0.5
    assert found is discovery.snapshot("weather")
    assert missing is None


def test_static_subscribe_and_close_are_harmless() -> None:
    calls: list[Snapshot] = []
    discovery = static(weather=(HostPort("10.0.0.1", 8001),))

    discovery.subscribe(calls.append)
    discovery.close()
    discovery.close()

    assert calls == []
    assert discovery.snapshot("weather") is not None


def test_static_discovery_satisfies_the_protocol() -> None:
    discovery: Discovery = static()
    assert discovery.knows("anything") is False


def test_make_discovery_from_environment_is_static_by_default() -> None:
    config = load_config({"MESH_STATIC_SERVICES": "weather=127.0.0.1:8001*2,127.0.0.1:8002"})

    discovery = make_discovery(config)

    assert isinstance(discovery, StaticDiscovery)
    snapshot = discovery.snapshot("weather")
    assert snapshot is not None
    assert [(e.address, e.weight) for e in snapshot.endpoints] == [
        ("127.0.0.1:8001", 2),
        ("127.0.0.1:8002", 1),
    ]


def test_make_discovery_picks_consul_when_configured() -> None:
    # Port 9 (discard) on loopback: nothing answers, and nothing needs to for this test.
    config = MeshConfig(discovery="consul", consul=ConsulSettings("http://127.0.0.1:9"))

    discovery = make_discovery(config)
    try:
        assert isinstance(discovery, ConsulDiscovery)
    finally:
        discovery.close()


def test_make_discovery_refuses_consul_without_an_address() -> None:
    with pytest.raises(ConfigError, match="CONSUL_HTTP_ADDR"):
        make_discovery(MeshConfig(discovery="consul", consul=None))
