"""The inbound side: middleware, reserved routes, deadlines, registration, drain, serve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from consul_agent import ConsulAgent, ConsulFactory, unique
from meshlib._config import load_config
from meshlib.resilience._deadline import Deadline, inbound_deadline
from meshlib.security import LocalCA
from missing_tools import require_tool
from polling import wait_until
from served import APPS, ServedFactory

TARGETS = ["fastapi_app:app", "flask_app:app"]


# ----------------------------------------------------------------------------- real servers


@pytest.mark.parametrize("target", TARGETS)
def test_apps_behind_the_middleware_serve_normally_and_admin_routes_only_on_the_admin_port(
    serve: ServedFactory, target: str
) -> None:
    served = serve(target, {"MESH_SERVICE_NAME": "hello", "MESH_SERVICE_VERSION": "v1"})
    assert httpx.get(f"{served.url}/hello").json()["hello"] == "hello"
    assert served.admin_port != served.port
    health = httpx.get(f"{served.admin_url}/mesh/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ready"
    assert health.json()["version"] == "v1"
    assert httpx.get(f"{served.admin_url}/mesh/health/live").status_code == 200
    metrics = httpx.get(f"{served.admin_url}/mesh/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'meshlib_ready{service_name="hello"} 1' in metrics.text
    assert httpx.get(f"{served.admin_url}/metrics").text.startswith("# HELP")
    assert httpx.get(f"{served.admin_url}/mesh/status").json()["services"] == {}
    assert httpx.get(f"{served.admin_url}/mesh/nothing").status_code == 404
    # through the app's port, no caller reads health, metrics or status, forwarded or not
    forged = {"x-forwarded-for": "127.0.0.1", "forwarded": "for=127.0.0.1", "x-real-ip": "::1"}
    for path in ("/mesh/health", "/mesh/metrics", "/mesh/status", "/mesh/health/live"):
        answer = httpx.get(f"{served.url}{path}", headers=forged)
        assert answer.status_code == 404, (path, answer.text)
        assert "meshlib_" not in answer.text
        assert "hello" not in answer.text.replace(path, "")


@pytest.mark.parametrize(
    ("serve", "expected"),
    [("uvloop", "uvloop"), ("asyncio", "asyncio.unix_events")],
    indirect=["serve"],
)
def test_serve_runs_asgi_apps_on_uvloop_when_it_is_installed_and_on_asyncio_otherwise(
    serve: ServedFactory, expected: str
) -> None:
    served = serve("fastapi_app:app", {"MESH_SERVICE_NAME": "hello"})
    assert httpx.get(f"{served.url}/loop").json() == {"loop": expected}


@pytest.mark.parametrize("target", TARGETS)
def test_several_workers_share_the_one_admin_port(serve: ServedFactory, target: str) -> None:
    served = serve(target, {"MESH_SERVICE_NAME": "hello"}, args=("--workers", "2"))
    for _ in range(20):  # a new connection each: the kernel spreads them among the workers
        with httpx.Client(base_url=served.admin_url) as admin:
            assert admin.get("/mesh/health").json()["status"] == "ready"
    text = httpx.get(f"{served.admin_url}/mesh/metrics").text
    assert 'meshlib_ready{service_name="hello"} 1' in text
    assert httpx.get(f"{served.url}/mesh/metrics").status_code == 404


@pytest.mark.parametrize("target", TARGETS)
def test_forwarded_headers_never_change_who_the_caller_is(
    serve: ServedFactory, target: str
) -> None:
    served = serve(target, {"MESH_SERVICE_NAME": "hello"})
    forged = {
        "x-forwarded-for": "192.0.2.7",
        "x-forwarded-proto": "https",
        "forwarded": "for=192.0.2.7;proto=https",
        "x-real-ip": "192.0.2.7",
    }
    seen = httpx.get(f"{served.url}/client", headers=forged).json()
    assert seen == {"host": "127.0.0.1", "scheme": "http"}  # the TCP peer, as it connected


@pytest.mark.parametrize("target", TARGETS)
def test_a_request_whose_deadline_is_gone_gets_504_and_the_handler_never_runs(
    serve: ServedFactory, target: str
) -> None:
    # plaintext callers are unidentified: their deadlines count only when told to
    served = serve(target, {"MESH_SERVICE_NAME": "hello", "MESH_UNIDENTIFIED_DEADLINE": "honour"})
    refused = httpx.get(f"{served.url}/hello", headers={"x-mesh-deadline-ms": "0"})
    assert refused.status_code == 504
    assert refused.json()["error"] == "deadline exceeded"
    assert httpx.get(f"{served.url}/handled").json()["count"] == 0
    budget = httpx.get(f"{served.url}/deadline", headers={"x-mesh-deadline-ms": "1500"})
    assert 1.0 < budget.json()["remaining"] <= 1.5
    assert httpx.get(f"{served.url}/deadline").json()["remaining"] is None
    assert httpx.get(f"{served.url}/handled").json()["count"] == 2


@pytest.mark.parametrize("target", TARGETS)
def test_drain_goes_unready_and_finishes_requests_in_flight(
    serve: ServedFactory, target: str
) -> None:
    served = serve(target, {"MESH_SERVICE_NAME": "hello", "MESH_SHUTDOWN_DELAY": "1s"})
    results: list[httpx.Response] = []
    slow = threading.Thread(
        target=lambda: results.append(httpx.get(f"{served.url}/slow?ms=1500", timeout=10))
    )
    slow.start()
    wait_until(
        lambda: (
            httpx.get(f"{served.admin_url}/mesh/metrics").text.count("in_flight{")
            and (
                'in_flight{service_name="hello"} 1'
                in httpx.get(f"{served.admin_url}/mesh/metrics").text
            )
        ),
        what="the slow request in flight",
    )
    served.terminate()
    health = wait_until(
        lambda: (r := httpx.get(f"{served.admin_url}/mesh/health")).status_code == 503 and r,
        what="readiness to go 503",
    )
    assert health.json()["status"] == "draining"
    slow.join(15)
    assert [r.status_code for r in results] == [200]
    served.wait(30)


def test_serve_reports_a_bad_target_in_one_line() -> None:
    for target, message in [
        ("nosuch:app", "meshlib serve: cannot import 'nosuch': no such module"),
        ("fastapi_app:nope", "meshlib serve: module 'fastapi_app' has no attribute 'nope'"),
        ("fastapi_app:HANDLED", "is a dict, not an ASGI or WSGI application"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "meshlib", "serve", target, "--port", "0"],
            cwd=APPS,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert message in result.stderr


def test_serve_stops_on_a_bad_environment_value_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshlib", "serve", "fastapi_app:app", "--port", "0"],
        cwd=APPS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"MESH_DRAIN_TIMEOUT": "forever", "PATH": ""},
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "meshlib serve: MESH_DRAIN_TIMEOUT='forever': expected a duration such as 250ms, 2s, "
        "1m or a number of seconds"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_a_missing_ca_is_one_line_for_asgi_and_wsgi_before_any_address_is_announced(
    target: str,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshlib", "serve", target, "--port", "0"],
        cwd=APPS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            **os.environ,
            "MESH_TLS": "strict",
            "MESH_SERVICE_NAME": "hello",
            "MESH_TLS_DIR": "/nonexistent",
            "MESH_TLS_CA": "local",
        },
    )
    assert result.returncode == 1
    *before, last = result.stderr.strip().splitlines()
    assert last == (
        "meshlib serve: MESH_TLS='strict': expected a CA in MESH_TLS_DIR='/nonexistent' "
        "(no CA in /nonexistent: run `meshlib ca init` (or set MESH_TLS_DIR))"
    )
    # only the warning that in-process signing is for development comes before it
    assert [line.split(":")[0] for line in before] == ["MESH_TLS_CA=local"]


def test_an_error_importing_the_users_app_shows_their_own_traceback(tmp_path: Path) -> None:
    (tmp_path / "broken2.py").write_text('def build():\n    return {}["x"]\n\n\napp = build()\n')
    result = subprocess.run(
        [sys.executable, "-m", "meshlib", "serve", "broken2:app", "--port", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert f'File "{tmp_path / "broken2.py"}", line 5, in <module>' in result.stderr
    assert f'File "{tmp_path / "broken2.py"}", line 2, in build' in result.stderr
    assert "importlib" not in result.stderr  # only the user's frames
    assert "meshlib/" not in result.stderr
    assert lines[-2:] == [
        "KeyError: 'x'",
        "meshlib serve: importing 'broken2' failed: KeyError: 'x'",
    ]


# The app reads its own settings file (as python-dotenv's load_dotenv would) and builds its
# meshlib client from them: in the lifespan for FastAPI, at import for Flask.
READS_SETTINGS = "os.environ.update(line.split('=', 1) for line in open('app.env').read().split())"
CONFIG_ERROR_APPS = {
    "fastapi": f"""
import contextlib, os
from fastapi import FastAPI
import meshlib

@contextlib.asynccontextmanager
async def lifespan(app):
    {READS_SETTINGS}
    async with meshlib.AsyncClient() as client:
        app.state.client = client
        yield

app = FastAPI(lifespan=lifespan)
""",
    "flask": f"""
import os
from flask import Flask
import meshlib

{READS_SETTINGS}
client = meshlib.Client()
app = Flask(__name__)
""",
}


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("framework", sorted(CONFIG_ERROR_APPS))
def test_a_config_error_while_the_app_starts_is_one_line_and_a_failed_exit(
    tmp_path: Path, framework: str, workers: str
) -> None:
    # with several uvicorn workers the app starts in each of them, after the supervisor
    # forked: one line still, no traceback per worker, no address announced, exit 1
    (tmp_path / "settings_app.py").write_text(CONFIG_ERROR_APPS[framework])
    (tmp_path / "app.env").write_text("MESH_RETRY_BACKOFF=soon\n")
    command = ["serve", "settings_app:app", "--port", "0", "--workers", workers]
    result = subprocess.run(
        [sys.executable, "-m", "meshlib", *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))},
            "MESH_SERVICE_NAME": "hello",
        },
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        "meshlib serve: MESH_RETRY_BACKOFF='soon': expected a duration such as 250ms, 2s, "
        "1m or a number of seconds"
    )


# ----------------------------------------------------------------------------- with Consul


@pytest.mark.parametrize("target", TARGETS)
def test_registration_appears_in_consul_with_a_passing_check_and_leaves_on_shutdown(
    serve: ServedFactory, consul: ConsulAgent, target: str
) -> None:
    name = unique("reg")
    served = serve(
        target,
        {
            "CONSUL_HTTP_ADDR": consul.http_addr,
            "MESH_SERVICE_NAME": name,
            "MESH_SERVICE_VERSION": "v2",
            "MESH_SERVICE_TAGS": "blue,eu",
            "MESH_HEALTH_INTERVAL": "500ms",
            "MESH_SHUTDOWN_DELAY": "100ms",
        },
    )
    entries = wait_until(
        lambda: consul.get(f"/v1/health/service/{name}?passing=1"), what="a passing instance"
    )
    service = entries[0]["Service"]
    assert service["Port"] == served.port
    assert service["Address"] == "127.0.0.1"
    assert service["Meta"]["version"] == "v2"
    assert service["Meta"]["admin-port"] == str(served.admin_port)
    assert service["Tags"] == ["blue", "eu"]
    assert service["ID"] == f"{name}-127.0.0.1-{served.port}"
    agent_view = consul.get(f"/v1/agent/service/{service['ID']}")
    assert agent_view["Connect"] == {"Native": True}
    checks = entries[0]["Checks"]
    http_check = next(c for c in checks if c["Type"] == "http")
    assert http_check["Status"] == "passing"  # on the admin listener, not the app's port
    assert http_check["Interval"] == "500ms"
    assert http_check["ServiceID"] == service["ID"]

    served.terminate()
    wait_until(lambda: consul.get(f"/v1/catalog/service/{name}") == [], what="deregistration")
    served.wait(30)


@pytest.mark.parametrize("target", TARGETS)
def test_rolling_restart_behind_a_mesh_client_loses_no_request(
    serve: ServedFactory, consul: ConsulAgent, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    name = unique("roll")
    env = {
        "CONSUL_HTTP_ADDR": consul.http_addr,
        "MESH_SERVICE_NAME": name,
        "MESH_HEALTH_INTERVAL": "300ms",
        "MESH_SHUTDOWN_DELAY": "500ms",
    }
    instances = [serve(target, env) for _ in range(3)]
    wait_until(
        lambda: len(consul.get(f"/v1/health/service/{name}?passing=1")) == 3, what="3 passing"
    )
    monkeypatch.setenv("CONSUL_HTTP_ADDR", consul.http_addr)
    monkeypatch.setenv("MESH_RETRY_BACKOFF", "5ms")
    ok: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with meshlib.Client() as client:
            for _ in range(100_000):  # bounded; `stop` ends it
                if stop.is_set():
                    return
                try:
                    response = client.get(f"http://{name}/hello")
                    if response.status_code == 200:
                        ok.append(response.json()["pid"])
                    else:
                        failures.append(f"status {response.status_code}")
                except Exception as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for index, old in enumerate(list(instances)):
            wanted = 50 * (index + 1)
            wait_until(lambda wanted=wanted: len(ok) > wanted, what="traffic")
            old.terminate()
            old.wait(30)
            new = serve(target, env)
            instances.append(new)

            def passing(port: int = new.port) -> bool:
                entries = consul.get(f"/v1/health/service/{name}?passing=1")
                return any(e["Service"]["Port"] == port for e in entries)

            wait_until(passing, what="the new instance passing")
            pid, seen_at = new_pid(new), len(ok)
            wait_until(
                lambda pid=pid, seen_at=seen_at: pid in ok[seen_at:],
                what="traffic on the new instance",
            )
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    print(f"\nrolling restart of {target}: {len(ok)} requests, {len(failures)} failed")
    assert failures == []
    assert len(ok) > 200


def new_pid(served: Any) -> int:
    return int(httpx.get(f"{served.url}/hello").json()["pid"])


def test_the_registration_asks_consul_to_remove_a_crashed_instance() -> None:
    # Consul does not report DeregisterCriticalServiceAfter back, and acting on it takes over
    # a minute, so the payload is checked here.
    from meshlib.instance import Registration

    config = load_config(
        {
            "CONSUL_HTTP_ADDR": "127.0.0.1:8500",
            "MESH_SERVICE_NAME": "geo",
            "MESH_DEREGISTER_AFTER": "90s",
            "MESH_HEALTH_INTERVAL": "2s",
        }
    )
    assert config.consul is not None
    registration = Registration(
        config, config.consul, address="10.0.0.5", port=9001, admin=("127.0.0.1", 9901)
    )
    try:
        assert registration._check == {
            "HTTP": "http://127.0.0.1:9901/mesh/health",
            "Interval": "2000ms",
            "Timeout": "2000ms",
            "DeregisterCriticalServiceAfter": "90000ms",
        }
        assert registration.service_id == "geo-10.0.0.5-9001"
    finally:
        registration.close()


def test_a_server_registering_in_consul_needs_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:8500")

    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    with pytest.raises(meshlib.ConfigError, match="MESH_SERVICE_NAME is unset"):
        meshlib.ASGIMiddleware(app)


# ----------------------------------------------------------------------------- in process


@pytest.mark.anyio
async def test_outbound_calls_made_while_serving_inherit_the_callers_deadline() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        deadline = inbound_deadline.get()
        seen["remaining"] = None if deadline is None else deadline.remaining()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    config = load_config({"MESH_UNIDENTIFIED_DEADLINE": "honour"})
    middleware = meshlib.ASGIMiddleware(app, config=config)
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await client.get("/work", headers={"x-mesh-deadline-ms": "800"})
        assert 0.7 < seen["remaining"] <= 0.8
        await client.get("/work")
        assert seen["remaining"] is None
    assert inbound_deadline.get() is None


def test_an_inbound_deadline_caps_the_outbound_request_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from meshlib._pipeline import Call
    from meshlib._service import ServiceState
    from meshlib.discovery import Endpoint, Snapshot

    state = ServiceState("weather", load_config({}).defaults)
    state.update(Snapshot("weather", (Endpoint("127.0.0.1", 1),)))
    token = inbound_deadline.set(Deadline.after(0.5))
    try:
        call = Call(state, httpx.Request("GET", "http://weather/"))
    finally:
        inbound_deadline.reset(token)
    assert call.deadline.remaining() <= 0.5


async def run_lifespan(middleware: meshlib.ASGIMiddleware) -> list[str]:
    """Drive startup then shutdown as a server would; what was sent, with the mesh state."""
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, str]:
        return inbox.pop(0)

    async def send(message: Any) -> None:
        sent.append(f"{message['type']} (mesh {middleware.instance.state})")

    await middleware({"type": "lifespan"}, receive, send)
    return sent


@pytest.mark.anyio
async def test_lifespan_runs_the_apps_startup_first_and_drains_before_its_shutdown() -> None:
    order: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                order.append("app startup")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                order.append(f"app shutdown (mesh {middleware.instance.state})")
                await send({"type": "lifespan.shutdown.complete"})
                return

    middleware = meshlib.ASGIMiddleware(app, config=load_config({}))
    sent = await run_lifespan(middleware)
    assert order == ["app startup", "app shutdown (mesh stopped)"]
    assert sent == [
        "lifespan.startup.complete (mesh ready)",
        "lifespan.shutdown.complete (mesh stopped)",
    ]


@pytest.mark.anyio
async def test_an_app_without_lifespan_support_still_gets_the_mesh_lifespan() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("lifespan not supported")

    middleware = meshlib.ASGIMiddleware(app, config=load_config({}))
    assert await run_lifespan(middleware) == [
        "lifespan.startup.complete (mesh ready)",
        "lifespan.shutdown.complete (mesh stopped)",
    ]


def test_wsgi_counts_a_request_in_flight_until_its_body_is_closed() -> None:
    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("content-type", "text/plain")])
        return iter([b"a", b"b"])

    middleware = meshlib.WSGIMiddleware(app, config=load_config({}))
    environ = {"PATH_INFO": "/x", "REQUEST_METHOD": "GET", "SERVER_PORT": "80"}
    body = middleware(environ, lambda status, headers, exc_info=None: None)
    assert middleware.instance.in_flight == 1
    assert b"".join(body) == b"ab"
    body.close()  # type: ignore[attr-defined]
    assert middleware.instance.in_flight == 0
    assert middleware.instance.state == "ready"


def test_serve_binds_a_tcp_socket_so_asyncio_disables_nagle() -> None:
    # asyncio sets TCP_NODELAY on accepted connections only for sockets whose proto is TCP;
    # without it each uvicorn response waited ~40 ms for a delayed ACK.
    import socket

    from meshlib.server._serve import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_an_unreachable_consul_at_start_up_is_retried_while_the_app_serves(
    serve: ServedFactory, consul_factory: ConsulFactory
) -> None:
    agent = consul_factory()
    agent.stop()  # down when the app starts; back later on the same port
    name = unique("late")
    served = serve(
        "fastapi_app:app",
        {"CONSUL_HTTP_ADDR": agent.http_addr, "MESH_SERVICE_NAME": name},
    )
    assert httpx.get(f"{served.url}/hello").status_code == 200
    wait_until(lambda: b"could not register" in served.output, what="the warning")
    agent.restart()
    wait_until(
        lambda: agent.get(f"/v1/catalog/service/{name}"), timeout=15, what="the registration"
    )
    assert served.output.count(b"could not register") == 1
    assert b"Traceback" not in served.output


@pytest.mark.parametrize("target", TARGETS)
def test_readiness_waits_for_the_registration_and_ends_with_the_drain_liveness_does_not(
    serve: ServedFactory, consul_factory: ConsulFactory, tmp_path: Path, target: str
) -> None:
    """/mesh/health/ready (the orchestrator's probe): ready only when registered and the
    certificates are loaded, not ready while draining; /mesh/health/live stays 200."""
    LocalCA(tmp_path / "ca").init("meshlib.test")
    agent = consul_factory()
    agent.stop()  # down when the app starts: it serves, but is not registered
    name = unique("ready")
    served = serve(
        target,
        {
            "CONSUL_HTTP_ADDR": agent.http_addr,
            "MESH_SERVICE_NAME": name,
            "MESH_TLS": "strict",
            "MESH_TLS_CA": "local",
            "MESH_TLS_DIR": str(tmp_path / "ca"),
            "MESH_SHUTDOWN_DELAY": "2s",
        },
    )
    ready = httpx.get(f"{served.admin_url}/mesh/health/ready")
    assert ready.status_code == 503
    assert ready.json()["registered"] is False
    assert ready.json()["certificates"] == "loaded"
    assert httpx.get(f"{served.admin_url}/mesh/health/live").status_code == 200
    agent.restart()
    wait_until(
        lambda: httpx.get(f"{served.admin_url}/mesh/health/ready").status_code == 200,
        timeout=20,
        what="ready once registered",
    )
    served.terminate()
    wait_until(
        lambda: httpx.get(f"{served.admin_url}/mesh/health/ready").status_code == 503,
        what="not ready while draining",
    )
    assert httpx.get(f"{served.admin_url}/mesh/health/live").status_code == 200
    served.wait(30)


OPERATIONS = Path(__file__).parent.parent / "docs" / "operations.md"


def _yaml_blocks(markdown: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", markdown, flags=re.S)


def test_the_kubernetes_pod_spec_probes_the_admin_port_and_its_grace_covers_the_drain() -> None:
    (pod,) = [block for block in _yaml_blocks(OPERATIONS.read_text()) if "kind: Pod" in block]
    assert "readinessProbe:\n        httpGet: {path: /mesh/health/ready, port: admin}" in pod
    assert "livenessProbe:\n        httpGet: {path: /mesh/health/live, port: admin}" in pod
    assert '{name: MESH_ADMIN_ADDR, value: "0.0.0.0:9901"}' in pod
    assert "{name: admin, containerPort: 9901}" in pod
    env = dict(re.findall(r"\{name: (MESH_\w+), value: \"?([^}\"]+)\"?\}", pod))
    config = load_config(env)
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", pod).group(1))  # type: ignore[union-attr]
    assert grace > config.shutdown_delay + config.drain_timeout


def test_the_documented_kubernetes_scrape_config_passes_promtool(tmp_path: Path) -> None:
    (scrape,) = [
        block for block in _yaml_blocks(OPERATIONS.read_text()) if "kubernetes_sd_configs" in block
    ]
    (tmp_path / "prometheus.yml").write_text(scrape)
    result = subprocess.run(
        [require_tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("with_consul", [False, True], ids=["static", "consul"])
@pytest.mark.parametrize("target", TARGETS)
def test_sigterm_shuts_down_quietly_and_registration_is_logged_once_each_way(
    serve: ServedFactory, consul: ConsulAgent, target: str, with_consul: bool
) -> None:
    name = unique("quiet")
    env = {"MESH_SERVICE_NAME": name}
    if with_consul:
        env["CONSUL_HTTP_ADDR"] = consul.http_addr
    served = serve(target, env)
    assert httpx.get(f"{served.url}/hello").status_code == 200
    if with_consul:
        wait_until(lambda: consul.get(f"/v1/catalog/service/{name}"), what="the registration")
    served.terminate()
    served.wait(30)
    output = served.output.decode(errors="replace")
    assert "Traceback" not in output, output
    assert "Bad file descriptor" not in output, output
    if with_consul:
        assert output.count(f"registered {name}") - output.count(f"deregistered {name}") == 1
        assert output.count(f"deregistered {name}") == 1, output
