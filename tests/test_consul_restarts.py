"""Consul restarting under traffic: no blind spot, and an empty registry does not empty traffic.

A dev agent comes back from a restart empty, with an index far below the one before. The
callers' known instances must keep serving through that moment (the reset grace), and an
instance registered right after must be used at once, not after a blocking query that
waits on the old agent's index runs out (up to 30 s).
"""

from __future__ import annotations

import threading
import time

import pytest

import meshlib
from backends import BackendFactory
from consul_agent import ConsulFactory, register, unique
from polling import wait_until
from served import ServedFactory


@pytest.mark.consul
def test_ten_agent_restarts_lose_no_request_and_each_new_instance_is_used_within_2s(
    consul_factory: ConsulFactory, backends: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = consul_factory()
    service = unique("restarts")
    servers = backends.many(11)
    register(agent, service, f"{service}-{servers[0].name}", servers[0].port)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", agent.http_addr)
    monkeypatch.setenv("MESH_LB", "round_robin")
    served: list[tuple[float, str]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        with meshlib.Client() as client:
            for _ in range(200_000):  # bounded; stopped long before
                if stop.is_set():
                    return
                try:
                    text = client.get(f"http://{service}/whoami").text
                    served.append((time.monotonic(), text))
                except Exception as exc:
                    failures.append(exc)
                stop.wait(0.005)

    caller = threading.Thread(target=load, daemon=True)
    caller.start()
    try:
        wait_until(lambda: served, what="the first answer")
        delays = []
        for server in servers[1:]:
            agent.restart()  # on the same ports, empty
            registered_at = time.monotonic()
            register(agent, service, f"{service}-{server.name}", server.port)
            first = wait_until(
                lambda name=server.name, since=registered_at: next(
                    (at for at, text in reversed(served) if text == name and at >= since), None
                ),
                timeout=10,
                what=f"{server.name} used",
            )
            delays.append(first - registered_at)
    finally:
        stop.set()
        caller.join(10)
    print(f"10 restarts: new instance used after {[round(d, 2) for d in delays]} s")
    assert failures == []
    assert max(delays) <= 2.0, delays


@pytest.mark.consul
@pytest.mark.parametrize("target", ["fastapi_app:app", "flask_app:app"])
def test_a_served_instance_registers_again_when_its_agent_comes_back_empty(
    serve: ServedFactory, consul_factory: ConsulFactory, target: str
) -> None:
    agent = consul_factory()
    name = unique("again")
    served = serve(
        target,
        {"CONSUL_HTTP_ADDR": agent.http_addr, "MESH_SERVICE_NAME": name},
    )
    wait_until(lambda: agent.get(f"/v1/health/service/{name}?passing=1"), what="registered")

    agent.restart()  # dev mode: every registration is gone

    entries = wait_until(
        lambda: agent.get(f"/v1/health/service/{name}?passing=1"),
        timeout=10,
        what="registered again, its check passing",
    )
    assert [e["Service"]["Port"] for e in entries] == [served.port]
    assert served.output.count(b"registering again") == 1
    assert b"Traceback" not in served.output
