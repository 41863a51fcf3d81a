"""Consul ACLs on, default deny: the least-privilege policies of docs/security.md.

A real agent with ``acl { enabled = true, default_policy = "deny" }``; tokens made through
its HTTP API from the policy as docs/security.md prints it, so the page and the test cannot
drift apart. The chain is forecast -> geo (``chain_app``): forecast registers, finds geo,
calls it over mTLS with a Connect leaf, and geo asks Consul's intentions about forecast.
Then one permission at a time is taken away, and each absence must show as ONE line naming
the permission, not a stack trace, and not a line per retry.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import meshlib
import otlp_receiver
from consul_agent import ConsulAgent, ConsulFactory, acl_token
from meshlib._config import load_config
from meshlib.rollout._consul import ConsulAPI, RolloutError
from meshlib.rollout._consul_entries import (
    Match,
    instances,
    read_resolver,
    read_split,
    remove_route,
    write_route,
    write_split,
)
from meshlib.rollout._lock import ControllerLock
from meshlib.rollout._state import StateStore
from meshlib.security import LocalCA
from otlp_receiver import OtlpReceiver
from polling import wait_until
from served import APPS, Served, ServedFactory

DOC = Path(__file__).parent.parent / "docs" / "security.md"

#: the module-scoped OTLP receiver fixture of tests/otlp_receiver.py, for this module
otlp = otlp_receiver.otlp_receiver
_UPSTREAM_BLOCK = re.compile(r'service "<upstream>" \{[^}]*\}\n')


def documented_policy(kind: str) -> str:
    """The HCL block docs/security.md shows after ``<!-- policy: kind -->``."""
    text = DOC.read_text()
    start = text.index(f"<!-- policy: {kind} -->")
    block = text[start:].split("```hcl\n", 1)[1].split("```", 1)[0]
    return block


def service_policy(service: str, upstreams: tuple[str, ...] = (), *, drop: str = "") -> str:
    """The documented service policy for ``service`` calling ``upstreams``; ``drop``: a line
    (or block, by its first line) to leave out, to take one permission away."""
    hcl = documented_policy("service")
    upstream_block = _UPSTREAM_BLOCK.search(hcl)
    assert upstream_block is not None, "the documented policy has no upstream block"
    blocks = "".join(upstream_block.group().replace("<upstream>", u) for u in upstreams)
    hcl = _UPSTREAM_BLOCK.sub(lambda _: blocks, hcl).replace("<service>", service)
    if drop:
        assert drop in hcl, (drop, hcl)
        if drop.endswith("{"):  # a whole block
            hcl = re.sub(re.escape(drop) + r"[^}]*\}\n", "", hcl)
        else:
            hcl = hcl.replace(drop, "")
    return hcl


def lines_with(output: str, text: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


def mesh(
    consul: ConsulAgent,
    serve: ServedFactory,
    *,
    forecast_drop: str = "",
    geo_drop: str = "",
    extra: dict[str, str] | None = None,
) -> tuple[Served, Served]:
    """geo and forecast served with tokens of the documented policy (less one thing)."""
    env = {"CONSUL_HTTP_ADDR": consul.http_addr, "MESH_TLS": "permissive", **(extra or {})}
    geo_token = acl_token(consul, service_policy("geo", drop=geo_drop))
    forecast_token = acl_token(consul, service_policy("forecast", ("geo",), drop=forecast_drop))
    geo = serve(
        "chain_app:app", {**env, "MESH_SERVICE_NAME": "geo", "CONSUL_HTTP_TOKEN": geo_token}
    )
    forecast = serve(
        "chain_app:app",
        {**env, "MESH_SERVICE_NAME": "forecast", "CONSUL_HTTP_TOKEN": forecast_token},
    )
    return geo, forecast


def intentions(consul: ConsulAgent) -> None:
    """geo admits forecast; forecast admits anyone (the test calls it in plaintext)."""
    for name, source in (("geo", "forecast"), ("forecast", "*")):
        consul.put(
            "/v1/config",
            {
                "Kind": "service-intentions",
                "Name": name,
                "Sources": [{"Name": source, "Action": "allow"}],
            },
        )


def test_a_service_works_with_exactly_the_documented_token(
    consul_factory: ConsulFactory, serve: ServedFactory
) -> None:
    consul = consul_factory(acl=True)
    intentions(consul)
    geo, forecast = mesh(consul, serve)
    answer = httpx.get(f"{forecast.url}/forecast", timeout=15)
    assert answer.status_code == 200, answer.text
    assert answer.json()["geo"]["lat"] == 59.9  # forecast -> geo over mTLS, authorized
    registered = consul.get("/v1/catalog/services")
    assert {"geo", "forecast"} <= set(registered)
    # the token is in no answer of the admin listener (status lists Consul's address)
    tokens = [geo.env["CONSUL_HTTP_TOKEN"], forecast.env["CONSUL_HTTP_TOKEN"]]
    for served in (geo, forecast):
        for path in ("/mesh/status", "/mesh/metrics", "/mesh/health"):
            text = httpx.get(f"{served.admin_url}{path}").text
            assert not any(token in text or token[:8] in text for token in tokens), path
    geo.stop()
    forecast.stop()
    for served in (geo, forecast):
        output = served.output.decode(errors="replace")
        for bad in ("Permission denied", "lacks permission", "unreachable", "Traceback"):
            assert bad not in output, output
        assert "registered" in output
        assert not any(token in output or token[:8] in output for token in tokens)


def test_no_service_write_is_one_line_naming_it(
    consul_factory: ConsulFactory, serve: ServedFactory
) -> None:
    consul = consul_factory(acl=True)
    read_only = service_policy("forecast").replace('policy = "write"', 'policy = "read"')
    assert 'policy = "write"' not in read_only
    token = acl_token(consul, read_only)
    env = {
        "CONSUL_HTTP_ADDR": consul.http_addr,
        "CONSUL_HTTP_TOKEN": token,
        "MESH_SERVICE_NAME": "forecast",
    }
    # with mTLS the Connect leaf needs service:write too: start-up stops, in one line
    started = subprocess.run(
        [sys.executable, "-m", "meshlib", "serve", "chain_app:app", "--port", "0"],
        cwd=APPS,
        env={**os.environ, **env, "MESH_TLS": "permissive", "PYTHONPATH": str(APPS)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert started.returncode != 0
    assert started.stdout == b""
    lines = started.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "lacks permission 'service:write' on \"forecast\"" in lines[0]
    assert lines[0].startswith("meshlib serve: MESH_TLS_CA='consul': no certificate for")
    # without mTLS it serves, unregistered, and says why once, however often it retries
    forecast = serve("chain_app:app", {**env, "MESH_TLS": "off"})
    wait_until(
        lambda: b"could not register" in forecast.output, what="the registration to be refused"
    )
    wait_until(lambda: b"could not register" in forecast.output, what="a retry", timeout=1)
    forecast.stop()
    output = forecast.output.decode(errors="replace")
    refused = lines_with(output, "lacks permission")
    assert len(refused) == 1, output
    assert "could not register forecast in Consul" in refused[0]
    assert "lacks permission 'service:write' on \"forecast\"" in refused[0]
    assert "CONSUL_HTTP_TOKEN" in refused[0]
    assert "Traceback" not in output
    assert "unreachable" not in output


def test_no_read_of_an_upstream_is_an_error_naming_it(
    consul_factory: ConsulFactory,
) -> None:
    consul = consul_factory(acl=True)
    consul_register = {"Name": "geo", "ID": "geo-1", "Address": "127.0.0.1", "Port": 9}
    consul.put("/v1/agent/service/register", consul_register)
    token = acl_token(consul, service_policy("forecast", ("geo",), drop='service "geo" {'))
    env = {"CONSUL_HTTP_ADDR": consul.http_addr, "CONSUL_HTTP_TOKEN": token}
    with (
        meshlib.Client(config=load_config(env)) as client,
        pytest.raises(meshlib.NoHealthyEndpoints) as raised,
    ):
        client.get("http://geo/geo", timeout=10)
    message = str(raised.value)
    assert "\n" not in message
    assert "lacks permission 'service:read' on" in message
    assert '"geo"' in message
    assert "CONSUL_HTTP_TOKEN" in message


def test_no_key_read_is_one_line_naming_it(
    consul_factory: ConsulFactory, serve: ServedFactory
) -> None:
    consul = consul_factory(acl=True)
    intentions(consul)
    _, forecast = mesh(consul, serve, forecast_drop='key "meshlib/faults/forecast" {')
    for _ in range(3):  # it still serves; faults just do not come from Consul
        assert httpx.get(f"{forecast.url}/forecast", timeout=15).status_code == 200
    wait_until(lambda: b"key:read" in forecast.output, what="the KV refusal to be said")
    forecast.stop()
    output = forecast.output.decode(errors="replace")
    refused = lines_with(output, "lacks permission")
    assert len(refused) == 1, output
    assert "lacks permission 'key:read' on \"meshlib/faults/forecast\"" in refused[0]
    assert "unreachable" not in output
    assert "Traceback" not in output


#: A pure mesh client process: every log line of every library, then calls through the mesh.
CLIENT = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
import meshlib
with meshlib.Client() as client:
    for _ in range(3):
        print(client.get("http://forecast/forecast", timeout=15).text)
"""


def test_the_token_of_a_working_mesh_is_in_nothing_a_run_wrote(
    consul_factory: ConsulFactory, serve: ServedFactory, otlp: OtlpReceiver, tmp_path: Path
) -> None:
    consul = consul_factory(acl=True)
    intentions(consul)
    access = {name: tmp_path / f"{name}-access.jsonl" for name in ("geo", "forecast", "client")}
    telemetry = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "MESH_ACCESS_LOG": "json",
    }
    geo, forecast = mesh(consul, serve, extra=telemetry)
    # the same servers, but each writing its access log to a file of its own
    for served in (geo, forecast):
        served.stop()
        served.env["MESH_ACCESS_LOG_FILE"] = str(access[served.env["MESH_SERVICE_NAME"]])
        served.start()
    client_token = acl_token(consul, service_policy("client", ("forecast",)))
    client_env = {
        **telemetry,
        "CONSUL_HTTP_ADDR": consul.http_addr,
        "CONSUL_HTTP_TOKEN": client_token,
        "MESH_SERVICE_NAME": "client",
        "MESH_TLS": "permissive",
        "MESH_ACCESS_LOG_FILE": str(access["client"]),
        "OTEL_SERVICE_NAME": "client",
    }
    ran = subprocess.run(
        [sys.executable, "-c", CLIENT],
        env={**os.environ, **client_env},
        capture_output=True,
        timeout=90,
        check=False,
    )
    client_output = (ran.stdout + ran.stderr).decode(errors="replace")
    assert ran.returncode == 0, client_output
    assert client_output.count('"lat":59.9') == 3, client_output
    wait_until(
        lambda: {"client", "forecast", "geo"} <= {s.service for s in otlp.spans},
        what="spans from the client and both services",
    )
    written = {"client output": client_output}
    for served in (geo, forecast):
        name = served.env["MESH_SERVICE_NAME"]
        for path in ("/mesh/status", "/mesh/metrics", "/mesh/health"):
            written[f"{name} {path}"] = httpx.get(f"{served.admin_url}{path}").text
    geo.stop()
    forecast.stop()
    for served in (geo, forecast):
        name = served.env["MESH_SERVICE_NAME"]
        written[f"{name} output"] = served.output.decode(errors="replace")
    for name, path in access.items():
        written[f"{name} access log"] = path.read_text()
        assert written[f"{name} access log"].count("\n") >= 3, name
    written["spans"] = "\n".join(
        f"{s.service} {s.name} {s.attributes} {s.events}" for s in otlp.spans
    )
    tokens = [client_token, geo.env["CONSUL_HTTP_TOKEN"], forecast.env["CONSUL_HTTP_TOKEN"]]
    for source, text in written.items():
        assert text.strip(), f"{source} is empty: the scan would prove nothing"
        for token in tokens:
            assert token not in text, f"{source} holds a token:\n{text}"
            assert token[:8] not in text, f"{source} holds part of a token:\n{text}"


# ---- the rollout controller's token


def rollout_policy(service: str, *, drop: str = "") -> str:
    """The documented controller policy; ``drop`` a block by its first line, or
    ``"read only"``: the service's write lowered to read."""
    hcl = documented_policy("rollout").replace("<service>", service)
    if drop == "read only":
        assert 'policy = "write"' in hcl.split("node_prefix")[0]
        before, after = hcl.split("node_prefix", 1)
        return before.replace('policy = "write"', 'policy = "read"') + "node_prefix" + after
    if drop:
        assert drop in hcl, (drop, hcl)
        hcl = re.sub(re.escape(drop) + r"[^}]*\}\n", "", hcl)
    return hcl


def shop(consul: ConsulAgent) -> None:
    """``shop`` with subsets stable/canary, as an operator sets it up before a rollout."""
    consul.put("/v1/config", {"Kind": "service-defaults", "Name": "shop", "Protocol": "http"})
    consul.put(
        "/v1/config",
        {
            "Kind": "service-resolver",
            "Name": "shop",
            "DefaultSubset": "stable",
            "Subsets": {
                "stable": {"Filter": 'Service.Meta.version == "v1"'},
                "canary": {"Filter": 'Service.Meta.version == "v2"'},
            },
        },
    )
    for version, port in (("v1", 9001), ("v2", 9002)):
        consul.put(
            "/v1/agent/service/register",
            {"Name": "shop", "ID": f"shop-{version}", "Port": port, "Meta": {"version": version}},
        )


def controller_api(consul: ConsulAgent, token: str) -> ConsulAPI:
    settings = load_config({"CONSUL_HTTP_ADDR": consul.http_addr, "CONSUL_HTTP_TOKEN": token})
    assert settings.consul is not None
    return ConsulAPI(settings.consul)


def test_the_rollout_controller_works_with_exactly_the_documented_token(
    consul_factory: ConsulFactory,
) -> None:
    consul = consul_factory(acl=True)
    shop(consul)
    api = controller_api(consul, acl_token(consul, rollout_policy("shop")))
    lock = ControllerLock(api, "shop")
    try:
        assert lock.acquire() is None  # a session, and the lock key acquired with it
        resolver = read_resolver(api, "shop")
        wait_until(
            lambda: instances(api, resolver, "canary") and instances(api, resolver, "stable"),
            what="both subsets' instances readable",
        )
        write_split(api, "shop", "stable", "canary", 10)
        assert read_split(api, "shop") == {"stable": 90, "canary": 10}
        match = Match("header", "x-canary", "1")
        write_route(api, "shop", "canary", match)
        remove_route(api, "shop", match)
        store = StateStore(api, "shop")
        assert store.load() == (None, 0)
    finally:
        lock.release()
        api.close()


@pytest.mark.parametrize(
    ("drop", "permission"),
    [
        ('session_prefix "" {', "session:write"),
        ('key_prefix "meshlib/rollouts/shop" {', "key:write"),
        ('service "shop" {', "service:read"),
        ("read only", "service:write"),
    ],
)
def test_each_permission_the_rollout_controller_lacks_is_one_line(
    consul_factory: ConsulFactory, drop: str, permission: str
) -> None:
    consul = consul_factory(acl=True)
    shop(consul)
    api = controller_api(consul, acl_token(consul, rollout_policy("shop", drop=drop)))

    lock = ControllerLock(api, "shop")

    def rollout_steps() -> None:  # what a controller does first, in its order
        lock.acquire()
        read_resolver(api, "shop")
        write_split(api, "shop", "stable", "canary", 10)

    try:
        with pytest.raises(RolloutError) as raised:
            rollout_steps()
    finally:
        lock.release()  # stops its renewing thread, if it took the lock
        api.close()
    message = str(raised.value)
    assert "\n" not in message
    assert f"lacks permission '{permission}'" in message, message


def test_an_intention_check_consul_refuses_is_one_line_and_denies(
    consul_factory: ConsulFactory, serve: ServedFactory, tmp_path: Path
) -> None:
    # Consul answers /v1/agent/connect/authorize only for a token with service:write on the
    # destination. A leaf from Consul needs that too, so the refusal can only be met with
    # the mesh's own CA and Consul's intentions, as here.
    consul = consul_factory(acl=True)
    ca = tmp_path / "ca"
    LocalCA(ca).init("meshlib.test")
    read_only = service_policy("geo").replace('policy = "write"', 'policy = "read"')
    geo = serve(
        "chain_app:app",
        {
            "CONSUL_HTTP_ADDR": consul.http_addr,
            "CONSUL_HTTP_TOKEN": acl_token(consul, read_only),
            "MESH_SERVICE_NAME": "geo",
            "MESH_TLS": "permissive",
            "MESH_TLS_CA": "local",
            "MESH_TLS_DIR": str(ca),
        },
    )
    for _ in range(3):
        answer = httpx.get(f"{geo.url}/geo", timeout=15)
        assert answer.status_code == 403
        assert "AccessorID" not in answer.text  # the caller learns no token detail
    geo.stop()
    output = geo.output.decode(errors="replace")
    refused = lines_with(output, "cannot authorize callers for geo")
    assert len(refused) == 1, output
    assert "lacks permission 'service:write' on \"geo\"" in refused[0]
    assert "Traceback" not in output


def test_no_node_read_is_an_error_naming_it(consul_factory: ConsulFactory) -> None:
    consul = consul_factory(acl=True)
    consul.put(
        "/v1/agent/service/register",
        {"Name": "geo", "ID": "geo-1", "Address": "127.0.0.1", "Port": 9},
    )
    token = acl_token(consul, service_policy("forecast", ("geo",), drop='node_prefix "" {'))
    env = {"CONSUL_HTTP_ADDR": consul.http_addr, "CONSUL_HTTP_TOKEN": token}
    with (
        meshlib.Client(config=load_config(env)) as client,
        pytest.raises(meshlib.NoHealthyEndpoints) as raised,
    ):
        client.get("http://geo/geo", timeout=10)
    message = str(raised.value)  # Consul's catalog hides a service on nodes it cannot read
    assert "\n" not in message
    assert "'node:read' on the nodes it runs on" in message


def test_no_intentions_read_is_one_line_naming_it(
    consul_factory: ConsulFactory, serve: ServedFactory
) -> None:
    # A service's read or write implies intentions = "read" on it; only an explicit
    # intentions = "deny" takes it away (checked against Consul 1.22). Consul needs it to
    # answer /v1/agent/connect/authorize at all, L4 or L7.
    consul = consul_factory(acl=True)
    intentions(consul)
    no_intentions = service_policy("geo").replace(
        'policy = "write"', 'policy = "write"\n  intentions = "deny"'
    )
    assert 'intentions = "deny"' in no_intentions
    env = {"CONSUL_HTTP_ADDR": consul.http_addr, "MESH_TLS": "permissive"}
    geo = serve(
        "chain_app:app",
        {**env, "MESH_SERVICE_NAME": "geo", "CONSUL_HTTP_TOKEN": acl_token(consul, no_intentions)},
    )
    forecast_token = acl_token(consul, service_policy("forecast", ("geo",)))
    forecast = serve(
        "chain_app:app",
        {**env, "MESH_SERVICE_NAME": "forecast", "CONSUL_HTTP_TOKEN": forecast_token},
    )
    for _ in range(3):
        answer = httpx.get(f"{forecast.url}/forecast", timeout=15)
        assert answer.json()["geo"]["error"] == "forbidden", answer.text  # geo denied forecast
        assert "AccessorID" not in answer.text
    geo.stop()
    forecast.stop()
    output = geo.output.decode(errors="replace")
    refused = lines_with(output, "lacks permission")
    assert len(refused) == 1, output
    assert refused[0].startswith("cannot authorize callers for geo: ")
    assert "lacks permission 'intention:read' on \"geo\"" in refused[0]
    assert "Traceback" not in output
