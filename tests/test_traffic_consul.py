"""Traffic management from Consul's own config entries: a real agent, real servers.

The entries are written to Consul (``PUT /v1/config``) as an operator or ``consul config
write`` would; meshlib follows the compiled ``/v1/discovery-chain/<service>``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest

import meshlib
from backends import Backend, BackendFactory
from consul_agent import ConsulAgent, ConsulFactory, register, set_checks, unique
from meshlib.telemetry import prometheus_text
from polling import wait_until


class Fleet:
    """A service in Consul with v1 instances b0, b1 and a v2 instance b2, and its entries."""

    def __init__(
        self, agent: ConsulAgent, servers: list[Backend], ids: list[str], name: str = ""
    ) -> None:
        self.agent = agent
        self.name = name or unique("forecast")
        self.kinds: list[str] = []
        for server, version in zip(servers, ["v1", "v1", "v2"], strict=True):
            register(
                agent,
                self.name,
                f"{self.name}-{server.name}",
                server.port,
                ids=ids,
                Meta={"version": version},
            )
        # Routers and splitters need an L7 protocol (Consul refuses them for tcp).
        self.write({"Kind": "service-defaults", "Protocol": "http"})
        self.write(
            {
                "Kind": "service-resolver",
                "DefaultSubset": "v1",
                "Subsets": {
                    "v1": {"Filter": "Service.Meta.version == v1"},
                    "v2": {"Filter": "Service.Meta.version == v2"},
                },
            }
        )

    def write(self, entry: dict[str, Any]) -> None:
        entry = {**entry, "Name": self.name}
        assert self.agent.put("/v1/config", entry) is True
        if entry["Kind"] not in self.kinds:
            self.kinds.append(entry["Kind"])

    def split(self, v1: float, v2: float) -> None:
        self.write(
            {
                "Kind": "service-splitter",
                "Splits": [
                    {"Weight": v1, "ServiceSubset": "v1"},
                    {"Weight": v2, "ServiceSubset": "v2"},
                ],
            }
        )

    def url(self, path: str = "/whoami") -> str:
        return f"http://{self.name}{path}"

    def remove(self) -> None:
        for kind in reversed(self.kinds):  # routers and splitters before what they rely on
            self.agent.delete(f"/v1/config/{kind}/{self.name}")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("MESH_RETRY_BACKOFF", "5ms")
    monkeypatch.setenv("MESH_RETRY_BACKOFF_MAX", "20ms")
    # The first request to a service waits for its chain too: be generous on a busy machine.
    monkeypatch.setenv("MESH_DISCOVERY_TIMEOUT", "10s")
    return monkeypatch


@pytest.fixture
def fleet(
    consul: ConsulAgent, backends: BackendFactory, env: pytest.MonkeyPatch, registered: list[str]
) -> Iterator[Fleet]:
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    fleet = Fleet(consul, backends.many(3), registered)
    yield fleet
    fleet.remove()


def test_a_10_percent_split_in_consul_sends_10_percent_over_10000_requests(fleet: Fleet) -> None:
    fleet.split(90, 10)
    version = {"b0": "v1", "b1": "v1", "b2": "v2"}
    with meshlib.Client() as client:
        counts = Counter(version[client.get(fleet.url()).text] for _ in range(10_000))
    assert sum(counts.values()) == 10_000
    share = counts["v2"] / 10_000
    print(f"\nv2 share at a 10% weight written to Consul: {share:.2%} of 10,000 requests")
    assert abs(share - 0.10) <= 0.02


_STICKY_CLIENT = """
import json, sys
import meshlib
service, users, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
version = {"b0": "v1", "b1": "v1", "b2": "v2"}
seen = {}
with meshlib.Client() as client:
    for _ in range(rounds):
        for user in range(users):
            name = client.get(f"http://{service}/whoami", headers={"x-user": f"u{user}"}).text
            seen.setdefault(f"u{user}", set()).add(version[name])
print(json.dumps({user: sorted(versions) for user, versions in seen.items()}))
"""


def test_a_sticky_20_percent_split_keeps_every_user_on_one_version_across_processes(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
) -> None:
    """MESH_SPLIT_HASH_ON: 1,000 users x 20 requests from each of two client processes."""
    # A fixed name: the split of a user depends on the service name (the hash's salt), so
    # the share below is the same on every run (about 20% +- 1.3 points for a random name).
    fleet = Fleet(consul, backends.many(3), registered, name="sticky-forecast")
    try:
        fleet.split(80, 20)
        child_env = {
            **os.environ,
            "CONSUL_HTTP_ADDR": consul.http_addr,
            "MESH_SPLIT_HASH_ON": "header:x-user",
        }
        clients = [
            subprocess.Popen(
                [sys.executable, "-c", _STICKY_CLIENT, fleet.name, "1000", "20"],
                env=child_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(2)
        ]
        results = []
        for proc in clients:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err.decode(errors="replace")
            results.append(json.loads(out))
    finally:
        fleet.remove()
    first, second = results
    assert len(first) == len(second) == 1000
    assert all(len(versions) == 1 for versions in first.values()), "a user saw two versions"
    assert first == second, "a user was on different versions in the two processes"
    share = sum(versions == ["v2"] for versions in first.values()) / 1000
    print(f"\nsticky 20% split: {share:.1%} of 1,000 users on v2, each on one version")
    assert abs(share - 0.20) <= 0.02


def test_a_weight_change_in_consul_reaches_the_client_within_a_second(fleet: Fleet) -> None:
    fleet.split(100, 0)
    with meshlib.Client() as client:
        assert {client.get(fleet.url()).text for _ in range(20)} <= {"b0", "b1"}
        fleet.split(0, 100)
        changed = time.monotonic()
        wait_until(lambda: client.get(fleet.url()).text == "b2", what="v2 traffic")
        reached = time.monotonic() - changed
        assert {client.get(fleet.url()).text for _ in range(20)} == {"b2"}
    print(f"\nweight change written to Consul reached the client in {reached * 1000:.0f} ms")
    assert reached < 1.0


def test_a_router_header_match_in_consul_pins_requests_to_the_canary(fleet: Fleet) -> None:
    fleet.split(100, 0)
    fleet.write(
        {
            "Kind": "service-router",
            "Routes": [
                {
                    "Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
                    "Destination": {"ServiceSubset": "v2"},
                }
            ],
        }
    )
    with meshlib.Client() as client:
        pinned = Counter(client.get(fleet.url(), headers={"x-canary": "1"}).text for _ in range(50))
        unpinned = Counter(client.get(fleet.url()).text for _ in range(50))
    assert pinned == {"b2": 50}
    assert "b2" not in unpinned


def test_consul_routes_carry_their_timeout_and_retry_settings(
    fleet: Fleet, backends: BackendFactory
) -> None:
    fleet.write(
        {
            "Kind": "service-router",
            "Routes": [
                {
                    "Match": {"HTTP": {"PathPrefix": "/slow"}},
                    "Destination": {"RequestTimeout": "300ms", "ServiceSubset": "v2"},
                },
                {
                    "Match": {"HTTP": {"PathPrefix": "/status/500", "Methods": ["GET"]}},
                    "Destination": {
                        "ServiceSubset": "v2",
                        "NumRetries": 2,
                        "RetryOnStatusCodes": [500],
                    },
                },
            ],
        }
    )
    canary = backends.started[2]
    with meshlib.Client() as client:
        started = time.monotonic()
        with pytest.raises(meshlib.DeadlineExceeded):
            client.get(fleet.url("/slow?ms=3000"))
        assert time.monotonic() - started < 2.0
        before = canary.stats()["GET"]
        response = client.get(fleet.url("/status/500"))
        assert response.status_code == 500
        assert response.extensions["meshlib"].retry_reasons == ["500", "500"]
        assert canary.stats()["GET"] - before == 3  # the first try and two retries


def test_a_service_without_local_instances_is_served_from_the_other_datacenter(
    consul_factory: ConsulFactory, backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    dc1 = consul_factory()
    dc2 = consul_factory(datacenter="dc2", retry_join_wan=[dc1.serf_wan_addr])
    wait_until(lambda: "dc2" in dc1.get("/v1/catalog/datacenters"), timeout=20, what="the WAN join")
    local, remote = backends.many(2)
    service = unique("forecast")
    critical = {"TTL": "60s", "Status": "critical"}
    register(dc1, service, f"{service}-local", local.port, Check=critical)
    register(dc2, service, f"{service}-remote", remote.port)

    def dc1_sees_dc2() -> bool:  # the WAN join lists dc2 a little before it answers RPCs
        try:
            return bool(dc1.get(f"/v1/health/service/{service}?dc=dc2&passing=1"))
        except OSError:
            return False

    wait_until(dc1_sees_dc2, timeout=20, what="dc1 answering for dc2")
    resolver = {
        "Kind": "service-resolver",
        "Name": service,
        "Failover": {"*": {"Datacenters": ["dc2"]}},
    }
    assert dc1.put("/v1/config", resolver) is True
    env.setenv("CONSUL_HTTP_ADDR", dc1.http_addr)
    with meshlib.Client() as client:
        assert {client.get(f"http://{service}/whoami").text for _ in range(10)} == {"b1"}
        dc1.put(f"/v1/agent/check/pass/service:{service}-local")  # local is healthy again
        wait_until(
            lambda: client.get(f"http://{service}/whoami").text == "b0", what="local traffic"
        )
        dc1.put(f"/v1/agent/service/deregister/{service}-local")  # and now gone from dc1
        wait_until(lambda: client.get(f"http://{service}/whoami").text == "b1", what="dc2 again")
        assert {client.get(f"http://{service}/whoami").text for _ in range(10)} == {"b1"}


class _Garbler:
    """A proxy in front of a real agent that can garble its answers for paths under a prefix.

    Consul never serves a malformed chain or config entry, so this is the one place a test
    needs a fake.
    """

    def __init__(self, agent: ConsulAgent, prefix: str, garbage: Any) -> None:
        self.garble = threading.Event()
        garble, upstream, text = self.garble, agent.url, json.dumps(garbage).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    with urllib.request.urlopen(upstream + self.path, timeout=60) as answer:
                        status, headers, body = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as exc:
                    status, headers, body = exc.code, exc.headers, exc.read()
                if self.path.startswith(prefix) and garble.is_set():
                    status, body = 200, text
                self.send_response(status)
                self.send_header("X-Consul-Index", headers.get("X-Consul-Index", "1"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_malformed_chain_keeps_the_last_good_one_and_says_so_once(
    fleet: Fleet, env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = {"Chain": {"ServiceName": "x", "Datacenter": "dc1", "StartNode": 7}}
    proxy = _Garbler(fleet.agent, "/v1/discovery-chain/", garbage)
    env.setenv("CONSUL_HTTP_ADDR", proxy.address)
    fleet.split(0, 100)
    try:
        with meshlib.Client() as client, caplog.at_level(logging.ERROR, logger="meshlib"):
            assert client.get(fleet.url()).text == "b2"
            proxy.garble.set()
            fleet.split(100, 0)  # wakes the chain watch, which now reads garbage
            wait_until(lambda: caplog.records, what="the error")
            served = {client.get(fleet.url()).text for _ in range(30)}
    finally:
        proxy.close()
    assert served == {"b2"}  # still the last good split
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    message = errors[0]
    assert f"discovery chain of {fleet.name!r} is refused" in message
    assert "keeping the last good chain" in message


def test_service_defaults_passive_health_check_sets_the_ejection_of_that_upstream(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
) -> None:
    service, caller = unique("forecast"), unique("frontend")
    good, bad = backends.many(2)
    for server in (good, bad):
        register(consul, service, f"{service}-{server.name}", server.port, ids=registered)
    # Consul keeps the settings for calls *from* a service in that service's entry.
    defaults = {
        "Kind": "service-defaults",
        "Name": caller,
        "UpstreamConfig": {
            "Overrides": [
                {"Name": service, "PassiveHealthCheck": {"MaxFailures": 1, "Interval": "10s"}}
            ]
        },
    }
    assert consul.put("/v1/config", defaults) is True
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    env.setenv("MESH_SERVICE_NAME", caller)
    env.setenv("MESH_LB", "round_robin")
    env.setenv("MESH_OUTLIER_CONSECUTIVE_ERRORS", "5")  # what applies without the entry
    try:
        with meshlib.Client() as client:
            assert client.get(f"http://{service}/whoami").status_code == 200
            mesh = client._transport.mesh  # type: ignore[attr-defined]
            wait_until(
                lambda: mesh.services()[service].policy.outlier_consecutive_errors == 1,
                what="the service-defaults entry",
            )
            bad.set_mode(status=503)
            before = bad.stats().get("GET", 0)
            served = {client.get(f"http://{service}/whoami").text for _ in range(40)}
        assert served == {"b0"}  # the 503 was retried on the good instance
        assert bad.stats()["GET"] - before == 1  # ejected after one failure, not five
    finally:
        consul.delete(f"/v1/config/service-defaults/{caller}")


def test_service_defaults_limits_cap_the_requests_in_flight_with_a_clear_error(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
) -> None:
    service, caller = unique("forecast"), unique("frontend")
    (server,) = backends.many(1)
    register(consul, service, f"{service}-{server.name}", server.port, ids=registered)
    defaults = {
        "Kind": "service-defaults",
        "Name": caller,
        "UpstreamConfig": {"Defaults": {"Limits": {"MaxConcurrentRequests": 2}}},
    }
    assert consul.put("/v1/config", defaults) is True
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    env.setenv("MESH_SERVICE_NAME", caller)
    try:
        with meshlib.Client() as client:
            assert client.get(f"http://{service}/whoami").status_code == 200
            mesh = client._transport.mesh  # type: ignore[attr-defined]
            wait_until(lambda: mesh._capped, what="the service-defaults entry")
            slow = [
                threading.Thread(target=client.get, args=(f"http://{service}/slow?ms=1500",))
                for _ in range(2)
            ]
            for thread in slow:
                thread.start()
            wait_until(lambda: server.stats().get("GET", 0) == 3, what="two slow requests")
            refused_before = _refused_count(service)
            with pytest.raises(meshlib.CircuitOpen) as info:
                client.get(f"http://{service}/whoami")
            # refused before any attempt, it is still one observation of the duration
            assert _refused_count(service) == refused_before + 1
            for thread in slow:
                thread.join(10)
            assert client.get(f"http://{service}/whoami").status_code == 200  # room again
        assert "2 requests in flight" in str(info.value)
        assert "Limits.MaxConcurrentRequests" in str(info.value)
        assert server.stats()["GET"] == 4  # the refused request never reached the server
    finally:
        consul.delete(f"/v1/config/service-defaults/{caller}")


def _refused_count(service: str) -> float:
    """The client duration's count of requests to ``service`` that ended in CircuitOpen."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in prometheus_text().splitlines()
        if line.startswith("http_client_request_duration_seconds_count{")
        and f'service_peer_name="{service}"' in line
        and 'error_type="CircuitOpen"' in line
    )


def test_service_defaults_max_connections_queue_requests_and_max_pending_fails_fast(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
) -> None:
    """Envoy's max_connections and max_pending_requests, as Consul writes them: with 2
    connections busy the next request waits (pending) and is served once one is free; with
    1 already pending, the next fails at once with ``CircuitOpen``, never reaching the
    server."""
    service, caller = unique("forecast"), unique("frontend")
    (server,) = backends.many(1)
    register(consul, service, f"{service}-{server.name}", server.port, ids=registered)
    defaults = {
        "Kind": "service-defaults",
        "Name": caller,
        "UpstreamConfig": {
            "Overrides": [
                {"Name": service, "Limits": {"MaxConnections": 2, "MaxPendingRequests": 1}}
            ]
        },
    }
    assert consul.put("/v1/config", defaults) is True
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    env.setenv("MESH_SERVICE_NAME", caller)
    results: dict[str, int] = {}
    try:
        with meshlib.Client() as client:
            assert client.get(f"http://{service}/whoami").status_code == 200
            mesh = client._transport.mesh  # type: ignore[attr-defined]
            wait_until(lambda: mesh._capped, what="the service-defaults entry")

            def get(name: str, path: str) -> None:
                results[name] = client.get(f"http://{service}{path}").status_code

            slow = [
                threading.Thread(target=get, args=(f"slow{i}", "/slow?ms=1500")) for i in range(2)
            ]
            for thread in slow:
                thread.start()
            wait_until(lambda: server.stats().get("GET", 0) == 3, what="two slow requests")
            queued = threading.Thread(target=get, args=("queued", "/whoami"))
            queued.start()
            wait_until(lambda: mesh._pending.waiting(service) == 1, what="one request pending")
            with pytest.raises(meshlib.CircuitOpen) as info:
                client.get(f"http://{service}/whoami")
            for thread in (*slow, queued):
                thread.join(15)
            assert mesh._pending.waiting(service) == 0
            assert client.get(f"http://{service}/whoami").status_code == 200  # room again
        assert "Limits.MaxPendingRequests" in str(info.value)
        assert "1 requests pending" in str(info.value)
        assert results == {"slow0": 200, "slow1": 200, "queued": 200}  # it waited, then went
        assert server.stats()["GET"] == 5  # the refused request never reached the server
    finally:
        consul.delete(f"/v1/config/service-defaults/{caller}")


def test_an_async_client_queues_at_max_connections_too(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
) -> None:
    """The async transport waits on the event loop (never blocking it) as the sync one waits."""
    service, caller = unique("forecast"), unique("frontend")
    (server,) = backends.many(1)
    register(consul, service, f"{service}-{server.name}", server.port, ids=registered)
    limits = {"MaxConnections": 1, "MaxPendingRequests": 1}
    defaults = {
        "Kind": "service-defaults",
        "Name": caller,
        "UpstreamConfig": {"Defaults": {"Limits": limits}},
    }
    assert consul.put("/v1/config", defaults) is True
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    env.setenv("MESH_SERVICE_NAME", caller)

    async def scenario() -> tuple[list[int], str]:
        async with meshlib.AsyncClient() as client:
            assert (await client.get(f"http://{service}/whoami")).status_code == 200
            mesh = client._transport.mesh  # type: ignore[attr-defined]
            while not mesh._capped:
                await anyio.sleep(0.05)
            statuses: list[int] = []

            async def get(path: str) -> None:
                statuses.append((await client.get(f"http://{service}{path}")).status_code)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(get, "/slow?ms=1000")
                while server.stats().get("GET", 0) < 2:
                    await anyio.sleep(0.02)
                tasks.start_soon(get, "/whoami")  # pending behind the slow one
                while mesh._pending.waiting(service) < 1:
                    await anyio.sleep(0.005)
                with pytest.raises(meshlib.CircuitOpen) as info:
                    await client.get(f"http://{service}/whoami")
            return statuses, str(info.value)

    try:
        statuses, error = anyio.run(scenario)
    finally:
        consul.delete(f"/v1/config/service-defaults/{caller}")
    assert sorted(statuses) == [200, 200]
    assert "Limits.MaxPendingRequests" in error
    assert server.stats()["GET"] == 3


def test_a_service_without_entries_is_routed_as_without_chains(
    consul: ConsulAgent, backends: BackendFactory, env: pytest.MonkeyPatch, registered: list[str]
) -> None:
    service = unique("forecast")
    (server,) = backends.many(1)
    register(consul, service, f"{service}-{server.name}", server.port, ids=registered)
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    with meshlib.Client() as client:
        assert client.get(f"http://{service}/whoami").text == "b0"
        mesh = client._transport.mesh  # type: ignore[attr-defined]
        assert mesh.discovery.chain(service) is None  # Consul's default chain: nothing to do
        state = mesh.services()[service]
        request = client.build_request("GET", f"http://{service}/whoami")
        assert mesh.route(state, request) == (state, None)


@pytest.mark.parametrize(
    ("only_passing", "expression", "expected"),
    [
        (True, "Service.Meta.version == v1", {"b0": 150, "b1": 150}),
        (False, "Service.Meta.version == v1", {"b0": 100, "b1": 100, "b2": 100}),
        (None, "Service.Meta.version == v1", {"b0": 100, "b1": 100, "b2": 100}),  # false
        # a subset without a filter: every instance, no filtered query of its own
        (True, "", {"b0": 150, "b1": 150}),
    ],
)
def test_a_subsets_only_passing_decides_whether_an_instance_whose_check_warns_is_used(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
    only_passing: bool | None,
    expression: str,
    expected: dict[str, int],
) -> None:
    """service-resolver Subsets.<name>.OnlyPassing, as Consul configures Envoy with it."""
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    env.setenv("MESH_LB", "round_robin")
    name = unique("forecast")
    for server in backends.many(3):
        service_id = f"{name}-{server.name}"
        register(consul, name, service_id, server.port, ids=registered, Meta={"version": "v1"})
    set_checks(consul, name, {f"service:{name}-b2": "warning"})
    subset: dict[str, Any] = {"Filter": expression}
    if only_passing is not None:
        subset["OnlyPassing"] = only_passing
    resolver = {"Kind": "service-resolver", "DefaultSubset": "live", "Subsets": {"live": subset}}
    assert consul.put("/v1/config", {**resolver, "Name": name}) is True
    try:
        with meshlib.Client() as client:
            served = Counter(client.get(f"http://{name}/whoami").text for _ in range(300))
    finally:
        consul.delete(f"/v1/config/service-resolver/{name}")
    assert served == expected


@pytest.mark.parametrize(
    ("chain", "problem"),
    [
        ([], "the answer is not a JSON object"),
        ({"Chain": {"ServiceName": "s", "Datacenter": "dc1"}}, "None is not one of Chain.Nodes"),
        (
            {
                "Chain": {
                    "ServiceName": "s",
                    "Datacenter": "dc1",
                    "StartNode": "splitter:s",
                    "Nodes": {
                        "splitter:s": {
                            "Type": "splitter",
                            "Splits": [{"Weight": 100, "NextNode": "splitter:s"}],
                        }
                    },
                }
            },
            "leads back to itself",
        ),
        (
            {
                "Chain": {
                    "ServiceName": "s",
                    "Datacenter": "dc1",
                    "StartNode": "resolver:s",
                    "Nodes": {"resolver:s": {"Type": "resolver", "Resolver": {"Target": "t"}}},
                }
            },
            "'t' is not one of Chain.Targets",
        ),
        (
            {
                "Chain": {
                    "ServiceName": "s",
                    "Datacenter": "dc1",
                    "StartNode": "resolver:s",
                    "Nodes": {"resolver:s": {"Type": "resolver", "Resolver": {"Target": "t"}}},
                    "Targets": {"t": {"Service": "s", "Subset": {"OnlyPassing": "yes"}}},
                }
            },
            r"Targets\['t'\].Subset.OnlyPassing is not true or false",
        ),
    ],
)
def test_a_malformed_chain_is_refused_naming_the_problem(chain: Any, problem: str) -> None:
    from meshlib.routing._consul import compile_chain

    with pytest.raises(ValueError, match=problem):
        compile_chain(chain)


def test_a_failover_datacenter_out_of_reach_neither_delays_nor_breaks_routing(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    fleet.write(
        {
            "Kind": "service-resolver",
            "DefaultSubset": "v2",
            "Subsets": {"v2": {"Filter": "Service.Meta.version == v2"}},
            "Failover": {"*": {"Datacenters": ["dc-nowhere"]}},
        }
    )
    with meshlib.Client() as client, caplog.at_level(logging.WARNING, logger="meshlib"):
        started = time.monotonic()
        assert client.get(fleet.url()).text == "b2"  # the chain is in force from the start
        first = time.monotonic() - started
        assert {client.get(fleet.url()).text for _ in range(20)} == {"b2"}
    print(f"\nfirst request with an unreachable failover datacenter: {first * 1000:.0f} ms")
    assert first < 3.0
    unavailable = [r.getMessage() for r in caplog.records if "dc-nowhere" in r.getMessage()]
    assert len(unavailable) == 1, unavailable
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]


def test_a_malformed_service_defaults_keeps_the_last_good_settings_and_says_so_once(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, caller = unique("forecast"), unique("frontend")
    (server,) = backends.many(1)
    register(consul, service, f"{service}-{server.name}", server.port, ids=registered)

    def defaults(failures: int) -> dict[str, Any]:
        check = {"MaxFailures": failures}
        return {
            "Kind": "service-defaults",
            "Name": caller,
            "UpstreamConfig": {"Defaults": {"PassiveHealthCheck": check}},
        }

    assert consul.put("/v1/config", defaults(2)) is True
    garbage = {"Kind": "service-defaults", "UpstreamConfig": {"Overrides": "all of them"}}
    proxy = _Garbler(consul, "/v1/config/service-defaults/", garbage)
    env.setenv("CONSUL_HTTP_ADDR", proxy.address)
    env.setenv("MESH_SERVICE_NAME", caller)
    try:
        with meshlib.Client() as client, caplog.at_level(logging.ERROR, logger="meshlib"):
            assert client.get(f"http://{service}/whoami").status_code == 200
            state = client._transport.mesh.services()[service]  # type: ignore[attr-defined]
            wait_until(lambda: state.policy.outlier_consecutive_errors == 2, what="the entry")
            proxy.garble.set()
            assert consul.put("/v1/config", defaults(3)) is True  # wakes the watch
            wait_until(lambda: caplog.records, what="the error")
            assert client.get(f"http://{service}/whoami").status_code == 200
            assert state.policy.outlier_consecutive_errors == 2  # the last good settings
    finally:
        proxy.close()
        consul.delete(f"/v1/config/service-defaults/{caller}")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    message = errors[0]
    assert f"service-defaults {caller!r} is refused (UpstreamConfig.Overrides is not a list)" in (
        message
    )


@pytest.mark.anyio
async def test_the_async_client_follows_the_consul_chain_too(fleet: Fleet) -> None:
    fleet.split(0, 100)
    async with meshlib.AsyncClient() as client:
        served = {(await client.get(fleet.url())).text for _ in range(20)}
    assert served == {"b2"}


def test_without_connect_consul_has_no_chains_and_routing_goes_on_without_them(
    consul_factory: ConsulFactory,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = consul_factory(extra_args=["-hcl=connect { enabled = false }"])
    service = unique("forecast")
    (server,) = backends.many(1)
    register(agent, service, f"{service}-{server.name}", server.port)
    env.setenv("CONSUL_HTTP_ADDR", agent.http_addr)
    # an entry names the service, so its chain is asked for (a service named by none has
    # Consul's default chain, and nothing is asked)
    agent.put("/v1/config", {"Kind": "service-resolver", "Name": service, "ConnectTimeout": "3s"})
    with meshlib.Client() as client, caplog.at_level(logging.INFO, logger="meshlib"):
        started = time.monotonic()
        assert client.get(f"http://{service}/whoami").text == "b0"
        first = time.monotonic() - started
        assert client.get(f"http://{service}/whoami").text == "b0"
    assert first < 3.0  # not held for MESH_DISCOVERY_TIMEOUT (10 s) waiting for a chain
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 1, messages
    assert "discovery chain of" in messages[0]
    assert "Connect must be enabled" in messages[0]


def test_consul_splits_and_failover_reach_other_services_from_the_first_request(
    consul: ConsulAgent, backends: BackendFactory, env: pytest.MonkeyPatch, registered: list[str]
) -> None:
    front, moved, backup = unique("forecast"), unique("forecast-next"), unique("forecast-backup")
    a, b, c = backends.many(3)
    register(consul, front, f"{front}-a", a.port, ids=registered)
    register(consul, moved, f"{moved}-b", b.port, ids=registered)
    register(consul, backup, f"{backup}-c", c.port, ids=registered)
    critical = {"TTL": "60s", "Status": "critical"}
    gone = unique("forecast-gone")
    register(consul, gone, f"{gone}-a", a.port, ids=registered, Check=critical)
    entries = [
        {"Kind": "service-defaults", "Name": front, "Protocol": "http"},
        {"Kind": "service-defaults", "Name": moved, "Protocol": "http"},
        {"Kind": "service-splitter", "Name": front, "Splits": [{"Weight": 100, "Service": moved}]},
        {"Kind": "service-resolver", "Name": gone, "Failover": {"*": {"Service": backup}}},
    ]
    for entry in entries:
        assert consul.put("/v1/config", entry) is True
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    try:
        with meshlib.Client() as client:
            assert [client.get(f"http://{front}/whoami").text for _ in range(10)] == ["b1"] * 10
            assert [client.get(f"http://{gone}/whoami").text for _ in range(10)] == ["b2"] * 10
    finally:
        for entry in reversed(entries):
            consul.delete(f"/v1/config/{entry['Kind']}/{entry['Name']}")


def test_a_resolver_ring_hash_on_a_header_keeps_keys_and_moves_few_when_one_of_5_goes(
    consul: ConsulAgent,
    backends: BackendFactory,
    env: pytest.MonkeyPatch,
    registered: list[str],
) -> None:
    """service-resolver LoadBalancer: ring_hash with a header HashPolicy, 5 -> 4 instances."""
    env.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    name = unique("cache")
    servers = backends.many(5)
    for server in servers:
        register(consul, name, f"{name}-{server.name}", server.port, ids=registered)
    for entry in (
        {"Kind": "service-defaults", "Protocol": "http"},
        {
            "Kind": "service-resolver",
            "LoadBalancer": {
                "Policy": "ring_hash",
                "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}],
            },
        },
    ):
        assert consul.put("/v1/config", {**entry, "Name": name}) is True
    keys = [f"user-{i}" for i in range(1000)]
    try:
        with meshlib.Client() as client:

            def owners() -> dict[str, str]:
                url = f"http://{name}/whoami"
                return {k: client.get(url, headers={"x-user": k}).text for k in keys}

            before = owners()
            assert owners() == before, "a key changed instance with nothing changed"
            assert len(set(before.values())) == 5
            gone = servers[4].name
            consul.put(f"/v1/agent/service/deregister/{name}-{gone}")
            registered.remove(f"{name}-{gone}")
            wait_until(
                lambda: gone not in {client.get(f"http://{name}/whoami").text for _ in range(20)},
                what="the removed instance to leave the client's set",
            )
            after = owners()
    finally:
        for kind in ("service-resolver", "service-defaults"):
            consul.delete(f"/v1/config/{kind}/{name}")
    moved = sum(before[k] != after[k] for k in keys) / len(keys)
    on_gone = sum(before[k] == gone for k in keys) / len(keys)
    print(
        f"\nring hash 5 -> 4 instances: {moved:.1%} of 1,000 keys moved "
        f"({on_gone:.1%} had been on the removed one)"
    )
    assert gone not in after.values()
    assert moved == on_gone, "only the removed instance's keys may move"
    assert moved <= 0.25


def test_a_consul_route_rewrites_the_prefix_and_edits_request_and_response_headers(
    fleet: Fleet,
) -> None:
    fleet.write(
        {
            "Kind": "service-router",
            "Routes": [
                {
                    "Match": {"HTTP": {"PathPrefix": "/api/"}},
                    "Destination": {
                        "PrefixRewrite": "/",
                        "RequestHeaders": {
                            "Add": {"x-tag": "mesh"},
                            "Set": {"x-env": "prod"},
                            "Remove": ["x-secret"],
                        },
                        "ResponseHeaders": {"Set": {"x-routed": "api"}},
                    },
                }
            ],
        }
    )
    with meshlib.Client() as client:
        r = client.get(
            fleet.url("/api/echo"),
            headers={"x-tag": "caller", "x-env": "dev", "x-secret": "s"},
        )
        plain = client.get(fleet.url("/echo"), headers={"x-secret": "s"})
    assert r.status_code == 200, r.text  # /api/echo reached the backend as /echo
    seen = r.json()["headers"]
    assert seen["x-tag"] == "caller,mesh"
    assert seen["x-env"] == "prod"
    assert "x-secret" not in seen
    assert r.headers["x-routed"] == "api"
    assert plain.json()["headers"]["x-secret"] == "s"  # another route: no edits
    assert "x-routed" not in plain.headers


def test_a_consul_routes_retry_on_replaces_meshlibs_own_retry_conditions(fleet: Fleet) -> None:
    """RetryOn ["5xx"] retries a 500 (meshlib alone does not); ["retriable-4xx"] leaves a 503."""
    fleet.write(
        {
            "Kind": "service-router",
            "Routes": [
                {
                    "Match": {"HTTP": {"PathPrefix": "/status/500"}},
                    "Destination": {"NumRetries": 2, "RetryOn": ["5xx"]},
                },
                {
                    "Match": {"HTTP": {"PathPrefix": "/status/503"}},
                    "Destination": {"NumRetries": 2, "RetryOn": ["retriable-4xx"]},
                },
            ],
        }
    )
    with meshlib.Client() as client:
        five_hundred = client.get(fleet.url("/status/500"))
        unavailable = client.get(fleet.url("/status/503"))
        default = client.get(fleet.url("/status/502"))  # no route: meshlib's own rules
    assert five_hundred.status_code == 500
    assert five_hundred.extensions["meshlib"].attempts == 3
    assert unavailable.status_code == 503
    assert unavailable.extensions["meshlib"].attempts == 1
    assert default.extensions["meshlib"].attempts == 3


def test_a_consul_splits_request_and_response_headers_go_with_the_chosen_split(
    fleet: Fleet,
) -> None:
    fleet.write(
        {
            "Kind": "service-splitter",
            "Splits": [
                {
                    "Weight": 50,
                    "ServiceSubset": "v1",
                    "RequestHeaders": {"Set": {"x-split": "v1"}},
                    "ResponseHeaders": {"Set": {"x-served-by": "v1"}},
                },
                {
                    "Weight": 50,
                    "ServiceSubset": "v2",
                    "RequestHeaders": {"Set": {"x-split": "v2"}},
                    "ResponseHeaders": {"Set": {"x-served-by": "v2"}},
                },
            ],
        }
    )
    version = {"b0": "v1", "b1": "v1", "b2": "v2"}
    with meshlib.Client() as client:
        answers = [client.get(fleet.url("/echo")) for _ in range(40)]
    seen = Counter()
    for r in answers:
        body = r.json()
        split = version[body["instance"]]
        assert body["headers"]["x-split"] == split
        assert r.headers["x-served-by"] == split
        seen[split] += 1
    assert set(seen) == {"v1", "v2"}
