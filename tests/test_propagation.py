"""Debug routing across hops: MESH_PROPAGATE_HEADERS carries a mark to every later call.

Real parts: a private Consul agent (its Connect CA, discovery chains and routers), and six
``meshlib serve`` processes of tests/apps/chain_app.py, gateway -> forecast -> geo, each in a
``v1`` and a ``debug`` version, over mutual TLS.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest

import meshlib
from backends import BackendFactory
from consul_agent import ConsulAgent, ConsulFactory
from polling import wait_until
from served import ServedFactory

SERVICES = ("gateway", "forecast", "geo")


@pytest.fixture
def agent(consul_factory: ConsulFactory) -> ConsulAgent:
    agent = consul_factory()
    for name in SERVICES:
        assert agent.put(
            "/v1/config", {"Kind": "service-defaults", "Name": name, "Protocol": "http"}
        )
        resolver = {
            "Kind": "service-resolver",
            "Name": name,
            "DefaultSubset": "v1",
            "Subsets": {
                "v1": {"Filter": "Service.Meta.version == v1"},
                "debug": {"Filter": "Service.Meta.version == debug"},
            },
        }
        assert agent.put("/v1/config", resolver)
        router = {
            "Kind": "service-router",
            "Name": name,
            "Routes": [
                {
                    "Match": {"HTTP": {"Header": [{"Name": "x-debug", "Exact": "1"}]}},
                    "Destination": {"ServiceSubset": "debug"},
                }
            ],
        }
        assert agent.put("/v1/config", router)
    return agent


def _versions(body: dict[str, Any]) -> tuple[str, str, str]:
    return (body["gateway_version"], body["forecast_version"], body["geo"]["geo_version"])


def test_a_request_marked_at_the_edge_reaches_the_debug_version_at_every_hop(
    agent: ConsulAgent, serve: ServedFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = {
        "CONSUL_HTTP_ADDR": agent.http_addr,
        "MESH_TLS": "strict",
        "MESH_HEALTH_INTERVAL": "300ms",
        "MESH_DISCOVERY_TIMEOUT": "10s",
        "MESH_PROPAGATE_HEADERS": "x-debug",
        "MESH_SHUTDOWN_DELAY": "100ms",
        "MESH_DRAIN_TIMEOUT": "2s",
    }
    for name in reversed(SERVICES):
        for version in ("v1", "debug"):
            serve(
                "chain_app:app",
                {**common, "MESH_SERVICE_NAME": name, "MESH_SERVICE_VERSION": version},
            )
    # The edge: a mesh client of its own identity that marks the requests it chooses.
    monkeypatch.setenv("CONSUL_HTTP_ADDR", agent.http_addr)
    monkeypatch.setenv("MESH_SERVICE_NAME", "edge")
    monkeypatch.setenv("MESH_TLS", "strict")
    monkeypatch.setenv("MESH_DISCOVERY_TIMEOUT", "10s")
    with meshlib.Client(timeout=30) as client:

        def all_passing() -> bool:
            health = [agent.get(f"/v1/health/service/{n}?passing=1") for n in SERVICES]
            return all(len(instances) == 2 for instances in health)

        wait_until(all_passing, timeout=60, what="six instances passing in Consul")
        marked = Counter(
            _versions(client.get("http://gateway/plan", headers={"x-debug": "1"}).json())
            for _ in range(50)
        )
        unmarked = Counter(_versions(client.get("http://gateway/plan").json()) for _ in range(50))
    print(f"\nmarked: {dict(marked)}; unmarked: {dict(unmarked)}")
    assert marked == {("debug", "debug", "debug"): 50}
    assert unmarked == {("v1", "v1", "v1"): 50}


@pytest.mark.anyio
@pytest.mark.parametrize(("setting", "carried"), [("ignore", False), ("honour", True)])
async def test_a_mark_from_an_unidentified_caller_is_carried_only_when_so_configured(
    backends: BackendFactory, monkeypatch: pytest.MonkeyPatch, setting: str, carried: bool
) -> None:
    """DESIGN.md "Headers that steer": an outsider's mark is not passed on by default."""
    echo = backends("echo")
    monkeypatch.setenv("MESH_STATIC_SERVICES", f"echo={echo.address}")
    monkeypatch.setenv("MESH_PROPAGATE_HEADERS", "x-debug,x-tenant")
    monkeypatch.setenv("MESH_PROPAGATE_UNIDENTIFIED", setting)
    outbound = meshlib.AsyncClient()
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        # the handler sets x-tenant itself: its own value wins over the carried one
        r = await outbound.get("http://echo/echo", headers={"x-tenant": "own"})
        seen.update(r.json()["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    transport = httpx.ASGITransport(app=meshlib.ASGIMiddleware(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
        await client.get("/", headers={"x-debug": "1", "x-tenant": "theirs"})
    await outbound.aclose()
    assert seen.get("x-debug") == ("1" if carried else None)
    assert seen["x-tenant"] == "own"
