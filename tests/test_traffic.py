"""Traffic management with the embedded default: the local config file, real servers."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import meshlib
from backends import Backend, BackendFactory
from polling import wait_until

SUBSETS = {
    "Kind": "service-resolver",
    "Name": "forecast",
    "DefaultSubset": "v1",
    "Subsets": {
        "v1": {"Filter": "Service.Meta.version == v1"},
        "v2": {"Filter": "Service.Meta.version == v2"},
    },
}


def splitter(v1: float, v2: float) -> dict[str, Any]:
    return {
        "Kind": "service-splitter",
        "Name": "forecast",
        "Splits": [{"Weight": v1, "ServiceSubset": "v1"}, {"Weight": v2, "ServiceSubset": "v2"}],
    }


def write(path: Path, servers: dict[str, list[Backend]], *entries: dict[str, Any]) -> None:
    """Write the config file atomically, as an operator or the rollout controller would."""
    services = {
        "forecast": [
            {"address": s.address, "meta": {"version": version}}
            for version, group in servers.items()
            for s in group
        ]
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"services": services, "config_entries": list(entries)}))
    os.replace(tmp, path)


@pytest.fixture
def fleet(backends: BackendFactory) -> dict[str, list[Backend]]:
    v1a, v1b, v2 = backends.many(3)
    return {"v1": [v1a, v1b], "v2": [v2]}


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "mesh.json"
    monkeypatch.setenv("MESH_CONFIG_FILE", str(path))
    monkeypatch.setenv("MESH_RETRY_BACKOFF", "5ms")
    monkeypatch.setenv("MESH_RETRY_BACKOFF_MAX", "20ms")
    return path


def version_of(fleet: dict[str, list[Backend]], instance: str) -> str:
    return next(v for v, group in fleet.items() if instance in {s.name for s in group})


def test_a_10_percent_split_sends_10_percent_over_10000_requests(
    fleet: dict[str, list[Backend]], config_file: Path
) -> None:
    write(config_file, fleet, SUBSETS, splitter(90, 10))
    names = {s.name: version for version, group in fleet.items() for s in group}
    with meshlib.Client() as client:
        counts = Counter(names[client.get("http://forecast/whoami").text] for _ in range(10_000))
    assert sum(counts.values()) == 10_000
    share = counts["v2"] / 10_000
    print(f"\nv2 share at 10% weight: {share:.2%} of 10,000 requests")
    assert abs(share - 0.10) <= 0.02


def test_a_weight_change_reaches_clients_within_a_second(
    fleet: dict[str, list[Backend]], config_file: Path
) -> None:
    write(config_file, fleet, SUBSETS, splitter(100, 0))
    with meshlib.Client() as client:
        assert {client.get("http://forecast/whoami").text for _ in range(20)} <= {"b0", "b1"}
        write(config_file, fleet, SUBSETS, splitter(0, 100))
        changed = time.monotonic()
        wait_until(lambda: client.get("http://forecast/whoami").text == "b2", what="v2 traffic")
        reached = time.monotonic() - changed
        assert {client.get("http://forecast/whoami").text for _ in range(20)} == {"b2"}
    print(f"\nweight change reached the client in {reached * 1000:.0f} ms")
    assert reached < 1.0


def test_a_header_pins_requests_to_the_canary(
    fleet: dict[str, list[Backend]], config_file: Path
) -> None:
    router = {
        "Kind": "service-router",
        "Name": "forecast",
        "Routes": [
            {
                "Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
                "Destination": {"ServiceSubset": "v2"},
            }
        ],
    }
    write(config_file, fleet, SUBSETS, splitter(100, 0), router)
    with meshlib.Client() as client:
        pinned = Counter(
            client.get("http://forecast/whoami", headers={"x-canary": "1"}).text for _ in range(50)
        )
        unpinned = Counter(client.get("http://forecast/whoami").text for _ in range(50))
    assert pinned == {"b2": 50}
    assert "b2" not in unpinned


def test_routes_carry_their_own_timeout_and_retry_settings(
    fleet: dict[str, list[Backend]], config_file: Path
) -> None:
    router = {
        "Kind": "service-router",
        "Name": "forecast",
        "Routes": [
            {
                "Match": {"HTTP": {"PathPrefix": "/slow"}},
                "Destination": {"RequestTimeout": "300ms", "ServiceSubset": "v2"},
            },
            {
                "Match": {"HTTP": {"PathPrefix": "/status/500"}},
                "Destination": {
                    "ServiceSubset": "v2",
                    "NumRetries": 2,
                    "RetryOnStatusCodes": [500],
                },
            },
        ],
    }
    write(config_file, fleet, SUBSETS, router)
    canary = fleet["v2"][0]
    with meshlib.Client() as client:
        started = time.monotonic()
        with pytest.raises(meshlib.DeadlineExceeded):
            client.get("http://forecast/slow?ms=3000")
        assert time.monotonic() - started < 2.0
        before = canary.stats()["GET"]
        response = client.get("http://forecast/status/500")
        assert response.status_code == 500
        assert response.extensions["meshlib"].retry_reasons == ["500", "500"]
        assert canary.stats()["GET"] - before == 3  # the first try and two retries


def test_a_resolvers_connect_timeout_bounds_connecting_to_an_instance(
    backends: BackendFactory, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real listener whose accept queue is full: the kernel drops further SYNs, so a
    # connect to it hangs (until the client's connect timeout), as to a vanished host.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname(), timeout=5)
    (good,) = backends.many(1)
    monkeypatch.setenv("MESH_TIMEOUT", "20s")
    monkeypatch.setenv("MESH_LB", "round_robin")
    port = blackhole.getsockname()[1]
    services = {"forecast": [{"address": f"127.0.0.1:{port}"}, {"address": good.address}]}
    resolver = {"Kind": "service-resolver", "Name": "forecast", "ConnectTimeout": "200ms"}
    config_file.write_text(json.dumps({"services": services, "config_entries": [resolver]}))
    try:
        reasons = []
        with meshlib.Client() as client:
            for _ in range(2):  # round robin: one of them tries the blackhole first
                started = time.monotonic()
                response = client.get("http://forecast/whoami")
                took = time.monotonic() - started
                assert response.status_code == 200
                assert response.text == good.name
                assert took < 10  # the 200 ms connect timeout, not MESH_TIMEOUT's 20 s
                reasons.append(response.extensions["meshlib"].retry_reasons)
        assert ["connect"] in reasons
    finally:
        filler.close()
        blackhole.close()


def test_an_empty_subset_fails_over_to_another_service(
    backends: BackendFactory, config_file: Path
) -> None:
    (backup,) = backends.many(1, prefix="backup")
    resolver = {
        "Kind": "service-resolver",
        "Name": "forecast",
        "DefaultSubset": "v1",
        "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}},
        "Failover": {"*": {"Service": "forecast-backup"}},
    }
    document = {
        "services": {"forecast": [], "forecast-backup": [{"address": backup.address}]},
        "config_entries": [resolver],
    }
    config_file.write_text(json.dumps(document))
    with meshlib.Client() as client:
        assert client.get("http://forecast/whoami").text == "backup0"


def test_a_malformed_file_keeps_the_last_good_configuration_and_says_so_once(
    fleet: dict[str, list[Backend]], config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(config_file, fleet, SUBSETS, splitter(0, 100))
    with meshlib.Client() as client, caplog.at_level(logging.ERROR, logger="meshlib.routing"):
        assert client.get("http://forecast/whoami").text == "b2"
        config_file.write_text('{"config_entries": [{"Kind": "service-splitter", "Name": ')
        # The file is looked at on the request path (at most twice a second): keep calling.
        wait_until(
            lambda: client.get("http://forecast/whoami") and caplog.records, what="the error"
        )
        served = {client.get("http://forecast/whoami").text for _ in range(30)}
    assert served == {"b2"}  # still the last good split
    assert len(caplog.records) == 1
    assert "is refused (not JSON" in caplog.records[0].getMessage()


def test_a_bad_file_stops_start_up_with_one_line(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file.write_text(json.dumps({"config_entries": [splitter(50, 40)]}))
    with pytest.raises(meshlib.ConfigError) as info:
        meshlib.Client()
    assert "\n" not in str(info.value)
    assert "weights add up to 90, not 100" in str(info.value)
