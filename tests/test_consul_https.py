"""Every Consul-speaking feature over HTTPS, with ACLs on (issue 16).

One real ``consul agent -dev`` for the module, its HTTPS API on a free port with a
certificate whose only name is ``consul.test`` (so a client must send
``CONSUL_TLS_SERVER_NAME`` and trust ``CONSUL_CACERT``: the address is ``127.0.0.1``), and
ACLs on with default deny. Each feature is given the https address only, and a token holding
exactly the policy docs/security.md documents for it (read from the page, as in
tests/test_security_acl.py); the agent's plain HTTP port serves the tests' own set-up, with
the management token. Each test runs the feature as a user does: ``meshlib serve``
processes, ``meshlib.Client``, the ``meshlib`` CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import meshlib
from backends import BackendFactory
from consul_agent import ConsulAgent, acl_token, register
from meshlib._config import load_config
from polling import wait_until
from served import Served, ServedFactory
from test_discovery_consul import Pki
from test_security_acl import rollout_policy, service_policy, shop

SERVER_NAME = "consul.test"  # the only name in the agent's certificate


@dataclass(frozen=True)
class HttpsConsul:
    """The agent, and the environment that reaches its HTTPS API (no token yet)."""

    agent: ConsulAgent
    env: dict[str, str]
    trust_domain: str

    def with_token(self, rules: str, **extra: str) -> dict[str, str]:
        """``env`` with a new token holding only ``rules`` (HCL), and ``extra``."""
        return {**self.env, "CONSUL_HTTP_TOKEN": acl_token(self.agent, rules), **extra}


@pytest.fixture(scope="module")
def https(consul_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsConsul]:
    directory = tmp_path_factory.mktemp("consul-https")
    pki = Pki(directory)
    tls = (
        f'-hcl=tls {{ defaults {{ ca_file = "{pki.ca}", cert_file = "{pki.server_cert}", '
        f'key_file = "{pki.server_key}", verify_incoming = false }} }}'
    )
    agent = ConsulAgent(consul_bin, log_dir=directory, acl=True, https=True, extra_args=[tls])
    agent.start()
    try:
        # the agent's own token, as an operator gives every agent (`consul acl set-agent-token
        # agent`): Consul removes a deregistered instance from the catalog with it
        node = {"NodeName": agent.node_name, "Datacenter": agent.datacenter}
        agent_token = agent.put("/v1/acl/token", {"NodeIdentities": [node]})["SecretID"]
        agent.put("/v1/agent/token/agent", {"Token": agent_token})
        env = {
            "CONSUL_HTTP_ADDR": f"https://127.0.0.1:{agent.https_port}",
            "CONSUL_CACERT": str(pki.ca),
            "CONSUL_TLS_SERVER_NAME": SERVER_NAME,
        }
        yield HttpsConsul(agent, env, agent.get("/v1/agent/connect/ca/roots")["TrustDomain"])
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def geo(https: HttpsConsul) -> Iterator[Served]:
    """``geo``: strict mTLS, Consul's CA; intentions admit ``caller``, deny ``stranger``."""
    https.agent.put(
        "/v1/config",
        {
            "Kind": "service-intentions",
            "Name": "geo",
            "Sources": [
                {"Name": "caller", "Action": "allow"},
                {"Name": "stranger", "Action": "deny"},
            ],
        },
    )
    env = https.with_token(
        service_policy("geo"),
        MESH_SERVICE_NAME="geo",
        MESH_TLS="strict",
        MESH_TLS_CA="consul",
        MESH_HEALTH_INTERVAL="300ms",
    )
    served = Served("fastapi_app:app", env)
    try:
        served.start()
        wait_until(
            lambda: https.agent.get("/v1/health/connect/geo?passing=1"),
            timeout=15,
            what="geo registered and passing",
        )
        yield served
    finally:
        served.stop()


def mesh_client(https: HttpsConsul, name: str, upstreams: tuple[str, ...]) -> meshlib.Client:
    """A strict-mTLS client named ``name`` with its documented token and Consul's CA."""
    env = https.with_token(
        service_policy(name, upstreams),
        MESH_SERVICE_NAME=name,
        MESH_TLS="strict",
        MESH_TLS_CA="consul",
    )
    return meshlib.Client(config=load_config(env))


def meshlib_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``meshlib <args>`` run in a process of its own with ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "meshlib", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_client_calls_a_service_through_its_splitter_over_https(
    https: HttpsConsul, backends: BackendFactory
) -> None:
    # discovery (the node dump) and the discovery chain, with the documented client token
    agent = https.agent
    stable, canary = backends.many(2, prefix="shop")  # each answers /whoami with its name
    for server, version in ((stable, "v1"), (canary, "v2")):
        register(
            agent, "shop-https", f"shop-https-{version}", server.port, Meta={"version": version}
        )
    for entry in (
        {"Kind": "service-defaults", "Protocol": "http"},
        {
            "Kind": "service-resolver",
            "DefaultSubset": "v1",
            "Subsets": {
                "v1": {"Filter": "Service.Meta.version == v1"},
                "v2": {"Filter": "Service.Meta.version == v2"},
            },
        },
        {"Kind": "service-splitter", "Splits": [{"Weight": 100, "ServiceSubset": "v2"}]},
    ):
        assert agent.put("/v1/config", {**entry, "Name": "shop-https"}) is True
    env = https.with_token(service_policy("caller", ("shop-https",)))
    with meshlib.Client(config=load_config(env)) as client:
        answers = {client.get("http://shop-https/whoami", timeout=10).text for _ in range(10)}
    assert answers == {canary.name}  # the splitter's subset only: the chain came over HTTPS


@pytest.mark.parametrize(
    ("how", "name"),
    [
        ("token in CONSUL_HTTP_TOKEN", "registered-env"),
        # py-consul by itself would send the environment's empty CONSUL_HTTP_TOKEN
        ("token in CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_TOKEN empty", "registered-file"),
        # ... and verify the certificate with CONSUL_CACERT all the same
        ("CONSUL_HTTP_SSL_VERIFY=false, no server name", "registered-unverified"),
    ],
)
def test_meshlib_serve_registers_and_deregisters_over_https(
    https: HttpsConsul, serve: ServedFactory, tmp_path: Path, how: str, name: str
) -> None:
    env = https.with_token(service_policy(name), MESH_SERVICE_NAME=name, MESH_TLS="off")
    if "FILE" in how:
        token_file = tmp_path / "token"
        token_file.write_text(env["CONSUL_HTTP_TOKEN"] + "\n")
        env.update(CONSUL_HTTP_TOKEN="", CONSUL_HTTP_TOKEN_FILE=str(token_file))
    if "VERIFY" in how:
        del env["CONSUL_TLS_SERVER_NAME"]
        env["CONSUL_HTTP_SSL_VERIFY"] = "false"
    served = serve("fastapi_app:app", env)
    expected = f"{name}-127.0.0.1-{served.port}"

    def listed() -> list[str]:
        return [s["ServiceID"] for s in https.agent.get(f"/v1/catalog/service/{name}")]

    try:
        wait_until(listed, timeout=10, what=f"{name} registered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; its output:\n{served.output.decode()}") from None
    assert listed() == [expected]
    served.stop()
    output = served.output.decode(errors="replace")
    wait_until(lambda: not listed(), what=f"{name} deregistered; its output:\n{output}")
    assert f"registered {name} in Consul as {expected}" in output
    assert f"deregistered {expected} from Consul" in output
    assert "could not" not in output


def test_a_strict_mtls_call_with_leaves_from_consuls_ca_over_https(
    https: HttpsConsul, geo: Served
) -> None:
    with mesh_client(https, "caller", ("geo",)) as client:
        answer = client.get("http://geo/peer", timeout=10)
    assert answer.status_code == 200, answer.text
    # the caller's leaf (and geo's, for the handshake) came from Consul's Connect CA
    assert answer.json()["peer"] == f"spiffe://{https.trust_domain}/ns/default/dc/dc1/svc/caller"


def test_intentions_are_asked_over_https(https: HttpsConsul, geo: Served) -> None:
    with mesh_client(https, "stranger", ("geo",)) as client:
        denied = client.get("http://geo/peer", timeout=10)
    assert denied.status_code == 403, denied.text
    assert "DENY" in denied.json()["detail"]  # Consul's answer, not a failure to ask
    assert b"cannot authorize" not in geo.output


def test_faults_follow_the_kv_entry_over_https(https: HttpsConsul, geo: Served) -> None:
    key = "/v1/kv/meshlib/faults/geo"
    https.agent.put(key, {"abort_status": 418, "abort_percent": 100, "header": "x-chaos"})
    try:
        with mesh_client(https, "caller", ("geo",)) as client:

            def aborted() -> httpx.Response | None:
                response = client.get("http://geo/peer", headers={"x-chaos": "1"}, timeout=10)
                return response if response.status_code == 418 else None

            response = wait_until(aborted, timeout=10, what="geo's KV entry in force")
            assert response.headers["x-mesh-fault"]
            assert client.get("http://geo/peer", timeout=10).status_code == 200  # unmarked
    finally:
        https.agent.delete(key)
    assert b"(from Consul KV meshlib/faults/geo)" in geo.output


def test_meshlib_rollout_reaches_consul_over_https(https: HttpsConsul) -> None:
    shop(https.agent)
    env = https.with_token(rollout_policy("shop"))
    started = meshlib_cli(
        env, "rollout", "start", "shop", "--canary", "canary", "--prometheus", "http://127.0.0.1:9"
    )
    # the lock (a session), the state, the resolver, the splitter and both subsets'
    # instances were read over HTTPS; only then is Prometheus asked, and it is not there
    assert started.returncode == 1
    assert started.stderr.startswith(
        "meshlib rollout: cannot query Prometheus at http://127.0.0.1:9"
    )
    assert started.stderr.endswith("; no weight was moved\n")
    assert https.agent.get("/v1/session/list") == []  # the lock was given back
    status = meshlib_cli(env, "rollout", "status", "shop")
    assert status.returncode == 1
    assert status.stderr.startswith("meshlib rollout: no rollout of 'shop' in Consul")
    assert status.stderr.count("\n") == 1


def test_config_check_reaches_consul_and_its_connect_ca_over_https(https: HttpsConsul) -> None:
    env = https.with_token(
        service_policy("checked"), MESH_SERVICE_NAME="checked", MESH_TLS="strict"
    )
    checked = meshlib_cli(env, "config", "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    address = env["CONSUL_HTTP_ADDR"]
    assert any(
        line.startswith("ok    tls ")
        and f"spiffe://{https.trust_domain}/ns/default/dc/dc1/svc/checked from the Consul's" in line
        for line in lines
    ), lines
    assert any(line.startswith(f"ok    consul         {address}, leader ") for line in lines), lines
    assert any(line.startswith("ok    consul token   valid (") for line in lines), lines


@pytest.mark.parametrize("missing", ["CONSUL_TLS_SERVER_NAME", "CONSUL_CACERT"])
def test_without_the_server_name_or_the_ca_the_agent_is_not_trusted(
    https: HttpsConsul, missing: str
) -> None:
    env = https.with_token(rollout_policy("shop"))
    del env[missing]
    status = meshlib_cli(env, "rollout", "status", "shop")
    assert status.returncode == 1
    assert status.stderr.startswith(
        f"meshlib rollout: cannot reach Consul at {env['CONSUL_HTTP_ADDR']} (ConnectError: "
    )
    assert "CERTIFICATE_VERIFY_FAILED" in status.stderr
    checked = meshlib_cli(env, "config", "--check")
    assert checked.returncode == 1
    [consul] = [line for line in checked.stdout.splitlines() if line.startswith("FAIL  consul ")]
    assert "CERTIFICATE_VERIFY_FAILED" in consul
