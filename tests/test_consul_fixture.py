"""The Consul fixtures run a real agent: prove it before anything relies on it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from consul_agent import ConsulAgent, ConsulFactory
from polling import wait_until

pytestmark = pytest.mark.consul


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_tools_script_prints_a_working_consul(consul_bin: str) -> None:
    script = Path(__file__).with_name("tools.py")

    result = subprocess.run(
        [sys.executable, str(script), "consul"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )

    path = result.stdout.strip()
    version = subprocess.run([path, "version"], capture_output=True, text=True, check=True)
    assert "Consul v1.2" in version.stdout


def test_agent_is_a_leader_on_loopback_ports(consul: ConsulAgent) -> None:
    assert consul.http_addr == f"127.0.0.1:{consul.http_port}"
    assert consul.url == f"http://{consul.http_addr}"
    assert consul.get("/v1/status/leader")  # "127.0.0.1:<server port>"
    self_info = consul.get("/v1/agent/self")
    assert self_info["Config"]["Datacenter"] == "dc1"
    assert self_info["Config"]["NodeName"] == consul.node_name


def test_registered_service_is_in_catalog_and_health(
    consul: ConsulAgent, consul_client: Any
) -> None:
    name = unique("fixture")
    service_id = f"{name}-1"
    consul_client.agent.service.register(
        name, service_id=service_id, address="127.0.0.1", port=9001, tags=["blue"]
    )
    try:

        def in_catalog() -> list[dict[str, Any]]:
            _, nodes = consul_client.catalog.service(name)
            return nodes  # type: ignore[no-any-return]

        nodes = wait_until(in_catalog, what=f"{name} in the catalog")
        assert [(n["ServiceID"], n["ServicePort"], n["ServiceTags"]) for n in nodes] == [
            (service_id, 9001, ["blue"])
        ]
        health = consul.get(f"/v1/health/service/{name}")
        assert [(e["Service"]["ID"], e["Node"]["Node"]) for e in health] == [
            (service_id, consul.node_name)
        ]
    finally:
        consul_client.agent.service.deregister(service_id)
    wait_until(lambda: not consul.get(f"/v1/health/service/{name}"), what="deregistration")


def test_kv_put_get_delete_round_trip(consul_client: Any) -> None:
    key = f"meshlib-test/{unique('kv')}"

    assert consul_client.kv.put(key, "hello") is True
    _, entry = consul_client.kv.get(key)
    assert entry["Value"] == b"hello"
    assert consul_client.kv.delete(key) is True
    _, gone = consul_client.kv.get(key)
    assert gone is None


def test_restart_comes_back_on_the_same_port_and_empty(consul_factory: ConsulFactory) -> None:
    agent = consul_factory()
    port, pid = agent.http_port, agent.pid
    agent.put("/v1/agent/service/register", {"Name": "before-restart", "Port": 1})

    agent.restart()

    assert agent.http_port == port
    assert agent.pid != pid
    assert agent.get("/v1/status/leader")
    # Dev mode keeps nothing: what was registered before the restart is gone.
    assert agent.get("/v1/health/service/before-restart") == []


def test_stop_kills_the_process(consul_factory: ConsulFactory) -> None:
    agent = consul_factory()
    pid, port = agent.pid, agent.http_port
    assert pid is not None

    agent.stop()

    assert agent.pid is None
    assert not agent.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
    agent.stop()  # idempotent


def test_second_datacenter_joins_over_wan(consul_factory: ConsulFactory) -> None:
    dc1 = consul_factory()
    dc2 = consul_factory(datacenter="dc2", retry_join_wan=[dc1.serf_wan_addr])

    datacenters = wait_until(
        lambda: sorted(dc1.get("/v1/catalog/datacenters")) == ["dc1", "dc2"],
        timeout=15.0,
        what="dc2 in dc1's WAN pool",
    )

    assert datacenters
    assert dc2.get("/v1/agent/self")["Config"]["Datacenter"] == "dc2"
