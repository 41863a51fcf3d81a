"""The mesh client with a real Consul agent as its control plane."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import httpx
import pytest

import meshlib
from backends import Backend, BackendFactory
from consul_agent import ConsulAgent, ConsulFactory, register, set_checks, unique
from meshlib._runtime import live_meshes
from meshlib._status import render, status_report
from polling import wait_until


def register_backend(
    agent: ConsulAgent,
    service: str,
    backend: Backend,
    ids: list[str],
    *,
    weight: int = 1,
    warning_weight: int = 1,
) -> str:
    """Register ``backend`` as an instance of ``service``; returns its passing check's ID."""
    service_id = f"{service}-{backend.name}"
    weights = {"Passing": weight, "Warning": warning_weight}
    register(agent, service, service_id, backend.port, ids=ids, Weights=weights)
    return f"service:{service_id}"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("MESH_RETRY_BACKOFF", "5ms")
    monkeypatch.setenv("MESH_RETRY_BACKOFF_MAX", "20ms")
    return monkeypatch


def test_consul_instances_are_balanced_with_their_weights(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
) -> None:
    service = unique("wx")
    heavy, light = backends.many(2)
    register_backend(consul, service, heavy, registered, weight=3)
    register_backend(consul, service, light, registered)
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    env.setenv("MESH_LB", "round_robin")
    with meshlib.Client() as client:
        served = [client.get(f"http://{service}/whoami").text for _ in range(400)]
    assert served.count("b0") == 300
    assert served.count("b1") == 100


def test_an_instance_whose_check_warns_gets_traffic_and_a_critical_one_none(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
) -> None:
    # Consul's default (no service-resolver, so no OnlyPassing): a warning check leaves an
    # instance healthy, as Consul tells Envoy sidecars; a critical one takes it out. Two
    # passing instances of four keep panic mode (under 50% healthy) off.
    service = unique("wx")
    servers = backends.many(4)
    checks = [register_backend(consul, service, server, registered) for server in servers]
    set_checks(consul, service, {checks[2]: "warning", checks[3]: "critical"})
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    env.setenv("MESH_LB", "round_robin")
    with meshlib.Client() as client:
        served = Counter(client.get(f"http://{service}/whoami").text for _ in range(300))
    assert served == {"b0": 100, "b1": 100, "b2": 100}


@pytest.mark.parametrize(
    ("passing", "warning", "expected"),
    [
        (4, 2, {"b0": 100, "b1": 100, "b2": 200}),  # at Weights.Warning, not Passing
        (1, 0, {"b0": 200, "b1": 200}),  # Weights.Warning 0: unhealthy, as in Consul
    ],
)
def test_an_instance_whose_check_warns_is_balanced_at_its_warning_weight(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
    passing: int,
    warning: int,
    expected: dict[str, int],
) -> None:
    service = unique("wx")
    first, second, warned = backends.many(3)
    register_backend(consul, service, first, registered)
    register_backend(consul, service, second, registered)
    check = register_backend(
        consul, service, warned, registered, weight=passing, warning_weight=warning
    )
    set_checks(consul, service, {check: "warning"})
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    env.setenv("MESH_LB", "round_robin")
    with meshlib.Client() as client:
        served = Counter(client.get(f"http://{service}/whoami").text for _ in range(400))
    assert served == expected


def test_an_instance_whose_check_goes_critical_gets_no_traffic_within_a_second(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
) -> None:
    service = unique("wx")
    servers = backends.many(2)
    checks = [register_backend(consul, service, server, registered) for server in servers]
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    env.setenv("MESH_LB", "round_robin")
    served: list[tuple[float, str]] = []
    stop = threading.Event()
    failures: list[BaseException] = []

    def load() -> None:
        with meshlib.Client() as client:
            for _ in range(20_000):
                if stop.is_set():
                    return
                try:
                    text = client.get(f"http://{service}.service.consul/whoami").text
                    served.append((time.monotonic(), text))
                except Exception as exc:
                    failures.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_until(lambda: sum(1 for _, s in served if s == "b0") >= 10, what="b0 traffic")
        failed_at = time.monotonic()
        consul.put(f"/v1/agent/check/fail/{checks[0]}?note=test")
        wait_until(lambda: served and served[-1][0] > failed_at + 1.5, what="1.5 s of traffic")
    finally:
        stop.set()
        thread.join(30)
    last_b0 = max(t for t, s in served if s == "b0")
    assert last_b0 - failed_at < 1.0
    assert failures == []


def test_when_every_check_fails_at_once_requests_still_reach_the_instances(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
) -> None:
    # Health checks that all time out together (a starved checker, a slow health endpoint)
    # must not empty the service: panic mode uses the instances failing their checks, as
    # Envoy does with the UNHEALTHY endpoints Consul gives it. Seen in the chaos suite's
    # rolling restart: 34,546 GETs lost to NoHealthyEndpoints while the servers were fine.
    service = unique("wx")
    servers = backends.many(3)
    checks = [register_backend(consul, service, server, registered) for server in servers]
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    env.setenv("MESH_LB", "round_robin")
    with meshlib.Client() as client:
        assert {client.get(f"http://{service}/whoami").text for _ in range(9)} == {"b0", "b1", "b2"}
        state = live_meshes()[-1].services()[service]
        for check in checks:
            consul.put(f"/v1/agent/check/fail/{check}?note=timed+out")
        wait_until(lambda: len(state.unhealthy) == 3, what="every check failing")
        served = [client.get(f"http://{service}/whoami").text for _ in range(30)]
        assert sorted(set(served)) == ["b0", "b1", "b2"]
        report = status_report(live_meshes())
        assert [e["healthy"] for e in report["services"][service]["endpoints"]] == [False] * 3
        assert render(report).count("failing checks") == 3

        # one passes again: 1 of 3 healthy is under the 50% panic threshold, so all three
        # still share the load; with two passing, only those two are used
        consul.put(f"/v1/agent/check/pass/{checks[0]}")
        consul.put(f"/v1/agent/check/pass/{checks[1]}")
        wait_until(lambda: len(state.endpoints) == 2, what="two checks passing")
        served = [client.get(f"http://{service}/whoami").text for _ in range(30)]
        assert sorted(set(served)) == ["b0", "b1"]


def test_consul_down_keeps_the_last_snapshot_and_recovers_by_itself(
    consul_factory: ConsulFactory,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = consul_factory()
    first, second = backends.many(2)
    service = unique("wx")
    register_backend(agent, service, first, [])
    env.setenv("CONSUL_HTTP_ADDR", agent.http_addr)
    with meshlib.Client() as client, caplog.at_level(logging.INFO, logger="meshlib"):
        assert client.get(f"http://{service}/whoami").text == "b0"
        agent.stop()
        served = [client.get(f"http://{service}/whoami").text for _ in range(50)]
        assert served == ["b0"] * 50  # from the last snapshot, with Consul gone
        # Restart only once the watch has found the agent gone: 50 quick requests may take
        # less time than its next query (seen in CI: the agent was back before the watch
        # asked, so no outage was there to log)
        wait_until(
            lambda: any("unreachable" in r.getMessage() for r in caplog.records),
            timeout=30,
            what="the outage noticed",
        )
        assert client.get(f"http://{service}/whoami").text == "b0"

        agent.restart()  # dev mode comes back empty: the index goes backwards
        register_backend(agent, service, second, [])

        def serves_second() -> bool:
            try:
                return client.get(f"http://{service}/whoami").text == "b1"
            except meshlib.NoHealthyEndpoints:
                return False  # Consul came back empty: true until the registration lands

        # generous: a restarting dev agent on a loaded machine may answer 500 ("grpc: the
        # client connection is closing") for a while after its first answers (seen in CI)
        wait_until(serves_second, timeout=60, what="the new instance")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    outages = [r for r in warnings if "unreachable" in r.getMessage()]
    # one outage, logged once; a second only if the restarted agent failed again after
    # it had answered (a real second outage, not a flapping log)
    assert 1 <= len(outages) <= 2, [r.getMessage() for r in warnings]
    if len(outages) == 2:
        assert any("reachable again" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_async_client_follows_consul_health(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
) -> None:
    service = unique("wx")
    servers = backends.many(2)
    checks = [register_backend(consul, service, server, registered) for server in servers]
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    env.setenv("MESH_LB", "round_robin")
    async with meshlib.AsyncClient() as client:
        first = {(await client.get(f"http://{service}/whoami")).text for _ in range(10)}
        assert first == {"b0", "b1"}
        consul.put(f"/v1/agent/check/fail/{checks[1]}")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if (await client.get(f"http://{service}/whoami")).text == "b0":
                recent = {(await client.get(f"http://{service}/whoami")).text for _ in range(10)}
                if recent == {"b0"}:
                    break
        else:
            pytest.fail("traffic did not leave the critical instance")


def test_unknown_single_label_hosts_are_not_the_meshs(
    consul: ConsulAgent, env: pytest.MonkeyPatch
) -> None:
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    with meshlib.Client() as client:
        with pytest.raises(meshlib.NoHealthyEndpoints, match="not registered"):
            client.get(f"http://{unique('ghost')}.service.consul/")
        # a plain name Consul does not know is left to DNS; when DNS fails too, the error
        # says where the mesh looked, with DNS's own error as its cause
        with pytest.raises(meshlib.NoHealthyEndpoints) as info:
            client.get(f"http://{unique('ghost')}/", timeout=2)
        assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_a_name_consul_does_not_know_says_so_instead_of_a_dns_error(
    consul: ConsulAgent, env: pytest.MonkeyPatch
) -> None:
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    name = unique("nosuch")
    with meshlib.Client() as client, pytest.raises(meshlib.NoHealthyEndpoints) as caught:
        client.get(f"http://{name}/whoami")
    assert f"{name!r} is not a mesh service (Consul at " in str(caught.value)
    assert f"has no service {name!r}) and DNS does not know it either" in str(caught.value)
