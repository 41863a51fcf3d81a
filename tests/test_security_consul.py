"""Zero trust with Consul: Connect's CA, intentions, and Consul's own sidecar proxies."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import meshlib
from backends import Backend, BackendFactory, free_port
from consul_agent import ConsulAgent, register, unique
from polling import wait_until
from served import ServedFactory

DEFAULT_PORT_SERVICES = ("fastapi_app:app",)


def intention(agent: ConsulAgent, source: str, destination: str, action: str) -> None:
    agent.put(
        f"/v1/connect/intentions/exact?source={source}&destination={destination}",
        {"Action": action},
    )


def mesh_env(agent: ConsulAgent, name: str, **extra: str) -> dict[str, str]:
    return {
        "CONSUL_HTTP_ADDR": agent.http_addr,
        "MESH_SERVICE_NAME": name,
        "MESH_TLS": "strict",
        "MESH_INTENTIONS_CACHE": "100ms",
        "MESH_HEALTH_INTERVAL": "300ms",
        **extra,
    }


def as_client(monkeypatch: pytest.MonkeyPatch, agent: ConsulAgent, name: str) -> None:
    for key, value in mesh_env(agent, name).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MESH_RETRY_BACKOFF", "5ms")


class Proxies:
    """``consul connect proxy`` processes, stopped by PID after the test."""

    def __init__(self, binary: str, agent: ConsulAgent, log_dir: Path) -> None:
        self.binary = binary
        self.agent = agent
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"proxy-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [self.binary, "connect", "proxy", "-http-addr", self.agent.http_addr, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


@pytest.fixture
def proxies(consul_bin: str, tmp_path: Path, consul_factory: object) -> Iterator[Proxies]:
    holder: list[Proxies] = []

    def make(agent: ConsulAgent) -> Proxies:
        made = Proxies(consul_bin, agent, tmp_path)
        holder.append(made)
        return made

    yield make  # type: ignore[misc]
    for made in holder:
        made.stop()


@pytest.fixture
def agent(consul_factory: object) -> ConsulAgent:
    """A private agent: intentions and config are global, so tests do not share one."""
    return consul_factory()  # type: ignore[operator, no-any-return]


def test_meshlib_services_use_connects_ca_and_its_intentions(
    serve: ServedFactory, agent: ConsulAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    hello = unique("hello")
    served = serve("fastapi_app:app", mesh_env(agent, hello))
    wait_until(lambda: agent.get(f"/v1/health/connect/{hello}?passing=1"), what="hello in Connect")
    # strict mTLS, yet Consul's HTTP check passes: it asks the plaintext admin listener
    [check] = [c for c in agent.get(f"/v1/health/checks/{hello}") if c["ServiceName"] == hello]
    assert (check["Type"], check["Status"]) == ("http", "passing")
    as_client(monkeypatch, agent, "gateway")
    trust_domain = agent.get("/v1/agent/connect/ca/roots")["TrustDomain"]
    with meshlib.Client() as client:
        response = client.get(f"http://{hello}/peer")
        assert response.status_code == 200
        assert response.json()["peer"] == f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/gateway"

        intention(agent, "gateway", hello, "deny")
        denied = wait_until(
            lambda: (r := client.get(f"http://{hello}/hello")).status_code == 403 and r,
            timeout=15,
            what="the intention to apply",
        )
        assert "DENY" in denied.json()["detail"]
    # the server's log is read by another thread: wait for the line
    wait_until(lambda: b"denied GET /hello from spiffe://" in served.output, what="the log")
    before = handled_as_auditor(monkeypatch, agent, hello)
    as_client(monkeypatch, agent, "gateway")
    with meshlib.Client() as client:
        assert [client.get(f"http://{hello}/hello").status_code for _ in range(3)] == [403] * 3
    assert handled_as_auditor(monkeypatch, agent, hello) == before  # the handler never ran


def test_a_meshlib_client_calls_a_service_behind_consuls_own_sidecar(
    agent: ConsulAgent,
    proxies: object,
    backends: BackendFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    web = unique("web")
    app: Backend = backends("web-app")
    listener = free_port()
    register(
        agent,
        web,
        f"{web}-1",
        app.port,
        Connect={"SidecarService": {"Port": listener}},
    )
    sidecars = proxies(agent)  # type: ignore[operator]
    sidecars.start("-sidecar-for", f"{web}-1")
    wait_until(
        lambda: agent.get(f"/v1/health/connect/{web}?passing=1"), timeout=15, what="the sidecar"
    )
    as_client(monkeypatch, agent, "gateway")
    with meshlib.Client() as client:
        response = client.get(f"http://{web}/whoami")
        assert response.status_code == 200
        assert response.text == "web-app"
        assert response.extensions["meshlib"].endpoint == f"127.0.0.1:{listener}"

    intention(agent, "gateway", web, "deny")
    # Consul's proxy authorizes each new connection (and closes a denied one after the
    # handshake), so each check uses a new client, hence a new connection.
    wait_until(lambda: _refused(f"http://{web}/whoami"), timeout=15, what="the deny")
    received = app.stats()["GET"]
    assert _refused(f"http://{web}/whoami")
    assert app.stats()["GET"] == received  # the denied request never reached the app


def handled_as_auditor(monkeypatch: pytest.MonkeyPatch, agent: ConsulAgent, service: str) -> int:
    """How many requests ``service``'s handlers ran, asked by an identity no intention denies."""
    as_client(monkeypatch, agent, "auditor")
    with meshlib.Client() as client:
        return int(client.get(f"http://{service}/handled").json()["count"])


def _refused(url: str) -> bool:
    with meshlib.Client() as client:
        try:
            return client.get(url, extensions={"meshlib": {"retries": 0}}).status_code != 200
        except httpx.TransportError:
            return True


def test_consuls_upstream_proxy_calls_a_meshlib_server(
    serve: ServedFactory,
    agent: ConsulAgent,
    proxies: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hello = unique("hello")
    served = serve("fastapi_app:app", mesh_env(agent, hello))
    wait_until(lambda: agent.get(f"/v1/health/connect/{hello}?passing=1"), what="hello")
    upstream = free_port()
    caller = unique("legacy")
    proxy = proxies(agent)  # type: ignore[operator]
    proxy.start("-service", caller, "-upstream", f"{hello}:{upstream}")

    def call() -> httpx.Response | None:
        try:
            return httpx.get(f"http://127.0.0.1:{upstream}/peer", timeout=5)
        except httpx.TransportError:
            return None

    response = wait_until(call, timeout=20, what="the upstream listener")
    assert response.status_code == 200
    assert response.json()["peer"].endswith(f"/svc/{caller}")

    intention(agent, caller, hello, "deny")
    denied = wait_until(
        lambda: (r := call()) is not None and r.status_code == 403 and r,
        timeout=15,
        what="the deny",
    )
    assert "DENY" in denied.json()["detail"]
    wait_until(lambda: b"denied GET /peer" in served.output, what="the denial in the log")
    before = handled_as_auditor(monkeypatch, agent, hello)
    assert [r.status_code for r in (call(), call(), call()) if r is not None] == [403] * 3
    assert handled_as_auditor(monkeypatch, agent, hello) == before  # the handler never ran


def test_l7_intentions_decide_per_path_and_method(
    serve: ServedFactory, agent: ConsulAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    hello = unique("hello")
    agent.put("/v1/config", {"Kind": "service-defaults", "Name": hello, "Protocol": "http"})
    agent.put(
        "/v1/config",
        {
            "Kind": "service-intentions",
            "Name": hello,
            "Sources": [
                {
                    "Name": "gateway",
                    "Permissions": [
                        {"Action": "allow", "HTTP": {"PathPrefix": "/hello", "Methods": ["GET"]}},
                        {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
                    ],
                }
            ],
        },
    )
    serve("fastapi_app:app", mesh_env(agent, hello))
    wait_until(lambda: agent.get(f"/v1/health/connect/{hello}?passing=1"), what="hello")
    as_client(monkeypatch, agent, "gateway")
    with meshlib.Client() as client:
        assert client.get(f"http://{hello}/hello").status_code == 200
        assert client.get(f"http://{hello}/peer").status_code == 403
        assert client.post(f"http://{hello}/hello").status_code == 403


def test_a_consul_ca_root_rotation_reaches_the_processes_without_a_failed_request(
    serve: ServedFactory, agent: ConsulAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    hello = unique("hello")
    serve("fastapi_app:app", mesh_env(agent, hello))
    wait_until(lambda: agent.get(f"/v1/health/connect/{hello}?passing=1"), what="hello")
    as_client(monkeypatch, agent, "gateway")
    ok: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        for _ in range(500):  # a new client, so new handshakes, every 20 requests
            if stop.is_set():
                return
            with meshlib.Client() as client:
                for _ in range(20):
                    try:
                        status = client.get(f"http://{hello}/hello").status_code
                        (ok if status == 200 else failures).append(status)
                    except httpx.TransportError as exc:
                        failures.append(repr(exc))  # type: ignore[arg-type]

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_until(lambda: len(ok) > 50, timeout=30, what="traffic")
        with meshlib.Client() as probe:
            security = probe._transport.mesh.security  # type: ignore[attr-defined]
            before = security.tls.material
            agent.put(
                "/v1/connect/ca/configuration",
                {"Provider": "consul", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384}},
            )
            wait_until(
                lambda: security.tls.material.roots_digest != before.roots_digest,
                what="the new roots in this process",
            )
            # Consul re-signs leaves after a rotation with its own jitter (tens of seconds).
            wait_until(
                lambda: security.tls.material.cert_pem != before.cert_pem,
                timeout=60,
                what="a leaf from the new root",
            )
        seen = len(ok)
        wait_until(lambda: len(ok) > seen + 200, timeout=60, what="traffic after the rotation")
    finally:
        stop.set()
        thread.join(60)
    print(f"\nConsul CA rotation under load: {len(ok)} requests, {len(failures)} failed")
    assert failures == []
