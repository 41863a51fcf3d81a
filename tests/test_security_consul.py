"""Zero trust with Consul: Connect's CA, intentions, and Consul's own sidecar proxies."""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import meshlib
from backends import Backend, BackendFactory, free_port
from certs import context_for, odd_leaf
from consul_agent import ConsulAgent, register, unique
from polling import wait_until
from served import ServedFactory

TARGETS = ["fastapi_app:app", "flask_app:app"]

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


@pytest.mark.parametrize("target", TARGETS)
def test_l7_header_rules_and_the_app_read_a_repeated_header_alike(
    serve: ServedFactory, agent: ConsulAgent, monkeypatch: pytest.MonkeyPatch, target: str
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
                        {
                            "Action": "allow",
                            "HTTP": {
                                "PathPrefix": "/header/",
                                "Header": [{"Name": "x-role", "Exact": "reader"}],
                            },
                        },
                        {
                            "Action": "allow",
                            "HTTP": {
                                "PathPrefix": "/header/",
                                "Header": [{"Name": "x-team", "Prefix": "blue"}],
                            },
                        },
                        {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
                    ],
                }
            ],
        },
    )
    serve(target, mesh_env(agent, hello))
    wait_until(lambda: agent.get(f"/v1/health/connect/{hello}?passing=1"), what="hello")
    as_client(monkeypatch, agent, "gateway")
    with meshlib.Client() as client:
        one = client.get(f"http://{hello}/header/x-role", headers={"x-role": "reader"})
        assert one.json() == {"value": "reader"}
        # The rule reads "admin,reader" (Envoy's view), which is not "reader": the app,
        # which would read "admin" first, never runs.
        two = client.get(
            f"http://{hello}/header/x-role", headers=[("x-role", "admin"), ("x-role", "reader")]
        )
        assert two.status_code == 403
        # Allowed on "blue,red": the app is given that same value, not "blue" alone.
        teams = client.get(
            f"http://{hello}/header/x-team", headers=[("x-team", "blue"), ("x-team", "red")]
        )
        assert teams.json() == {"value": "blue,red"}


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
        # A new client, so new handshakes, every 20 requests; bounded, but above what runs
        # while Consul re-signs the leaves (up to a minute: 10,000 requests ran out first).
        for _ in range(10_000):
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


# ----------------------------------------------------------------------------- who may enter


def connect_ca_with_known_key(
    agent: ConsulAgent,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, str]:
    """Make Connect's CA sign with a root whose key the test holds (Consul's own API).

    Consul's leaf API signs only service identities; an agent's or a gateway's certificate
    from the same CA is what a real part of the mesh can hold, so the test signs one itself.
    Returns the root, its key and the trust domain.
    """
    trust_domain = agent.get("/v1/agent/connect/ca/roots")["TrustDomain"]
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    root_pem = root.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    agent.put(
        "/v1/connect/ca/configuration",
        {
            "Provider": "consul",
            "Config": {
                "PrivateKey": key_pem,
                "RootCert": root_pem,
                "PrivateKeyType": "ec",
                "PrivateKeyBits": 256,
            },
        },
    )

    def active() -> bool:
        roots = agent.get("/v1/agent/connect/ca/roots")["Roots"]
        return any(r["Active"] and r["RootCert"].strip() == root_pem.strip() for r in roots)

    wait_until(active, timeout=30, what="the test's root to sign")
    return root, key, trust_domain


@pytest.mark.parametrize("target", TARGETS)
def test_a_connect_signed_certificate_without_a_service_identity_never_passes_intentions(
    serve: ServedFactory, agent: ConsulAgent, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    root, key, trust_domain = connect_ca_with_known_key(agent)
    hello = unique("hello")
    intention(agent, "*", hello, "deny")
    intention(agent, "auditor", hello, "allow")
    served = serve(target, mesh_env(agent, hello))
    wait_until(lambda: agent.get(f"/v1/health/connect/{hello}?passing=1"), what="hello")
    roots = "".join(r["RootCert"] for r in agent.get("/v1/agent/connect/ca/roots")["Roots"])
    port = served.port
    for uri in (
        f"spiffe://{trust_domain}/agent/client/dc/dc1/id/node1",
        f"spiffe://{trust_domain}/gateway/mesh/dc/dc1",
        "spiffe://other.consul/ns/default/dc/dc1/svc/auditor",
    ):
        ctx = context_for(*odd_leaf(root, key, [uri]), roots)
        with httpx.Client(verify=ctx) as client:
            try:
                answer = client.get(f"https://127.0.0.1:{port}/peer", timeout=5)
            except httpx.TransportError:
                continue  # refused at the TLS layer
            raise AssertionError(f"{uri}: answered {answer.status_code} {answer.text}")
    assert handled_as_auditor(monkeypatch, agent, hello) == 0
    assert b"plaintext caller" not in served.output
    # the test's root really is the one the server trusts: a service leaf from it is a caller
    auditor = f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/auditor"
    with httpx.Client(verify=context_for(*odd_leaf(root, key, [auditor]), roots)) as client:
        assert client.get(f"https://127.0.0.1:{port}/peer").json() == {"peer": auditor}


@pytest.mark.parametrize("target", TARGETS)
def test_permissive_mode_judges_a_plaintext_caller_like_the_wildcard_source(
    serve: ServedFactory, agent: ConsulAgent, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    hello = unique("hello")
    intention(agent, "*", hello, "deny")
    intention(agent, "auditor", hello, "allow")
    served = serve(target, mesh_env(agent, hello, MESH_TLS="permissive"))
    wait_until(lambda: agent.get(f"/v1/health/connect/{hello}?passing=1"), what="hello")
    plain = httpx.get(f"{served.url}/peer", timeout=5)
    assert plain.status_code == 403
    assert "DENY" in plain.json()["detail"]
    wait_until(
        lambda: b"denied GET /peer from an unidentified caller" in served.output, what="the log"
    )
    assert handled_as_auditor(monkeypatch, agent, hello) == 0
    # a wildcard allow lets plaintext in again: the same rule as for any unnamed caller
    intention(agent, "*", hello, "allow")
    wait_until(
        lambda: httpx.get(f"{served.url}/peer", timeout=5).status_code == 200,
        timeout=15,
        what="the wildcard allow to apply",
    )


def test_the_old_rule_for_plaintext_callers_is_an_explicit_setting_warned_at_start(
    serve: ServedFactory, agent: ConsulAgent
) -> None:
    hello = unique("hello")
    intention(agent, "*", hello, "deny")
    served = serve(
        "fastapi_app:app",
        mesh_env(agent, hello, MESH_TLS="permissive", MESH_UNIDENTIFIED_CALLERS="allow"),
    )
    assert b"MESH_UNIDENTIFIED_CALLERS=allow" in served.output
    assert httpx.get(f"{served.url}/peer", timeout=5).json() == {"peer": None}
