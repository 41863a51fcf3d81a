"""The `meshlib` command: every planned subcommand is listed and either works or says so."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

import meshlib
from backends import free_port
from consul_agent import ConsulAgent
from meshlib._config import load_config
from meshlib.security import LocalCA
from served import ServedFactory

PLANNED = ["serve", "ca", "rollout", "status", "top", "demo"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshlib", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )


def test_help_lists_every_planned_subcommand() -> None:
    result = run("--help")
    assert result.returncode == 0
    for name in PLANNED:
        assert f"    {name} " in result.stdout, name


@pytest.mark.parametrize("name", PLANNED)
def test_every_subcommand_is_built(name: str) -> None:
    result = run(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "not built yet" not in result.stdout + result.stderr


def test_config_subcommand_reports_bad_values_one_line_each() -> None:
    result = run("config", env={"MESH_TIMEOUT": "soon", "MESH_LB": "fastest", "PATH": ""})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "meshlib: MESH_LB='fastest': expected one of round_robin, least_request, p2c_ewma, "
        "random, ring_hash",
        "meshlib: MESH_TIMEOUT='soon': expected a duration such as 250ms, 2s, 1m or a number "
        "of seconds",
    ]


def test_config_subcommand_prints_the_effective_configuration() -> None:
    result = run(
        "config", env={"MESH_STATIC_SERVICES": "weather=127.0.0.1:8001*2,[::1]:8002", "PATH": ""}
    )
    assert result.returncode == 0, result.stderr
    assert "static:     weather = 127.0.0.1:8001*2, [::1]:8002" in result.stdout


def test_config_prints_the_effective_settings_as_a_table_with_overrides_in_columns() -> None:
    result = run("config", env={"MESH_TIMEOUT": "2s", "MESH_CONFIG_FILE": "", "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert "ServicePolicy(" not in result.stdout
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line}
    assert rows["setting"] == ["default"]
    assert rows["timeout"] == ["2"]
    assert rows["lb"] == ["p2c_ewma"]


def test_config_check_fails_on_a_missing_ca_and_an_unreachable_consul(tmp_path: Path) -> None:
    result = run(
        "config",
        "--check",
        env={
            "MESH_TLS": "strict",
            "MESH_TLS_CA": "local",
            "MESH_SERVICE_NAME": "hello",
            "MESH_TLS_DIR": str(tmp_path / "nonexistent"),
            "CONSUL_HTTP_ADDR": f"http://127.0.0.1:{free_port()}",
            "PATH": "",
        },
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    (tls,) = [line for line in lines if line.startswith("FAIL  tls")]
    assert f"MESH_TLS_DIR='{tmp_path / 'nonexistent'}'" in tls
    (consul,) = [line for line in lines if line.startswith("FAIL  consul ")]
    assert "cannot reach" in consul
    assert "CONSUL_HTTP_ADDR" in consul


def test_config_check_passes_with_the_ca_and_a_reachable_consul(
    consul: ConsulAgent, tmp_path: Path
) -> None:
    LocalCA(tmp_path / "ca").init("meshlib.test")
    result = run(
        "config",
        "--check",
        env={
            "MESH_TLS": "strict",
            "MESH_TLS_CA": "local",
            "MESH_SERVICE_NAME": "hello",
            "MESH_TLS_DIR": str(tmp_path / "ca"),
            "CONSUL_HTTP_ADDR": consul.http_addr,
            "PATH": "",
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checks = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert [line.split()[:2] for line in checks] == [
        ["ok", "tls"],
        ["ok", "consul"],
        ["ok", "consul"],
    ], checks
    assert "spiffe://meshlib.test/ns/default/dc/dc1/svc/hello" in checks[0]
    assert "ACLs are disabled" in checks[2]


def test_top_without_a_reachable_prometheus_says_so_in_one_line() -> None:
    result = run("top", "--once", "--prometheus", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr.startswith("meshlib top: cannot query Prometheus at http://127.0.0.1:9")
    assert result.stderr.count("\n") == 1


def test_status_shows_each_destination_its_endpoints_and_ejections(serve: ServedFactory) -> None:
    port = free_port()
    # the dead endpoint hangs up on every connection (a refused one is out for only a
    # second, too short to be seen here)
    dead_socket = socket.create_server(("127.0.0.1", 0))
    dead = dead_socket.getsockname()[1]

    def hang_up() -> None:
        while True:
            try:
                connection, _ = dead_socket.accept()
            except OSError:
                return
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    forecast = serve(
        "chain_app:app",
        {"MESH_SERVICE_NAME": "forecast", "MESH_STATIC_SERVICES": f"geo=127.0.0.1:{port}"},
        port=port,
    )
    gateway = serve(
        "chain_app:app",
        {
            "MESH_SERVICE_NAME": "gateway",
            "MESH_STATIC_SERVICES": f"forecast={forecast.address},127.0.0.1:{dead}",
            "MESH_OUTLIER_CONSECUTIVE_ERRORS": "1",
            "MESH_LB": "round_robin",
        },
    )
    for _ in range(4):  # round robin reaches the dead endpoint, which is then ejected
        assert httpx.get(f"{gateway.url}/plan", timeout=20).status_code == 200

    result = run("status", gateway.admin_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "inbound: 0 in flight"  # a serving process: its inbound side first
    first = next(i for i, line in enumerate(lines) if line.startswith("forecast "))
    assert lines[first].split()[:5] == ["forecast", "breaker", "closed", "lb", "round_robin"]
    assert lines[first].endswith("1/2 usable")
    rows = {line.split()[0]: line for line in lines[first + 2 :]}
    assert rows[forecast.address].endswith(" ok")
    assert " ejected " in rows[f"127.0.0.1:{dead}"]

    dead_socket.close()
    result = run("status", "--json", forecast.admin_url)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (endpoint,) = report["services"]["geo"]["endpoints"]
    assert endpoint["address"] == forecast.address
    assert endpoint["ejected_for_s"] == 0
    assert endpoint["latency_ms"] > 0


def test_status_takes_host_port_of_a_strict_server_without_its_tls_settings(
    serve: ServedFactory, tmp_path: Path
) -> None:
    LocalCA(tmp_path / "ca").init("meshlib.test")
    served = serve(
        "fastapi_app:app",
        {
            "MESH_TLS": "strict",
            "MESH_TLS_DIR": str(tmp_path / "ca"),
            "MESH_TLS_CA": "local",
            "MESH_SERVICE_NAME": "hello",
        },
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))}
    result = run("status", "--json", served.admin_address, env=clean)  # no scheme, no MESH_TLS
    assert result.returncode == 0, result.stderr
    assert "services" in json.loads(result.stdout)

    result = run("status", served.address, env=clean)  # the app's port, by mistake
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"meshlib status: {served.address} does not serve /mesh/status")
    assert "MESH_ADMIN_ADDR" in result.stderr


def test_status_of_an_instance_with_fault_injection_says_so_first(serve: ServedFactory) -> None:
    faulty = serve(
        "chain_app:app",
        {"MESH_SERVICE_NAME": "geo", "MESH_FAULT_ABORT_STATUS": "500"},
    )
    result = run("status", faulty.admin_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FAULT INJECTION ON: ")
    assert "500" in lines[0]
    assert "from the environment" in lines[0]
    assert lines[-1] == "(this process has not called any mesh service yet)"


def test_status_is_for_loopback_peers_only_decided_by_address_not_text() -> None:
    def app(environ: object, start_response: object) -> list[bytes]:
        raise AssertionError("the app never sees /mesh/ routes")

    mesh_app = meshlib.WSGIMiddleware(app, config=load_config({"MESH_SERVICE_NAME": "web"}))
    # the admin listener's answer for a peer address (a real socket cannot come from these)
    for remote, expected in (
        ("192.0.2.7", 403),
        ("::1:5ee:bad:c0de", 403),  # starts with "::1", is not loopback
        ("127.evil.example", 403),
        ("::ffff:192.0.2.7", 403),
        ("", 403),
        ("127.0.0.1", 200),
        ("127.0.0.2", 200),
        ("::1", 200),
        ("::ffff:127.0.0.1", 200),
    ):
        answer = mesh_app.inbound.reserved("GET", "/mesh/status", remote)
        assert answer.status == expected, remote
    # through the app's port, never, whoever asks
    for remote in ("192.0.2.7", "127.0.0.1", "::1"):
        transport = httpx.WSGITransport(app=mesh_app, remote_addr=remote)  # type: ignore[arg-type]
        with httpx.Client(transport=transport, base_url="http://x") as c:
            assert c.get("/mesh/status").status_code == 404, remote


def test_status_of_an_unreachable_process_says_so_in_one_line() -> None:
    result = run("status", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stderr.startswith("meshlib status: cannot read http://127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1
