"""The process's owner: a ``Mesh`` per configuration owns discovery, security and the
server instance; clients and middlewares share it; closing it stops what it started."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from backends import BackendFactory
from consul_agent import ConsulAgent, register, unique
from meshlib._config import load_config
from meshlib._runtime import Mesh, live_meshes
from meshlib.security import LocalCA
from meshlib.telemetry import prometheus_text
from polling import wait_until


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _threads(name: str) -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == name)


def test_clients_and_middlewares_built_from_one_configuration_share_its_mesh() -> None:
    config = load_config({"MESH_SERVICE_NAME": "hello", "MESH_STATIC_SERVICES": "a=1.2.3.4:80"})
    shared = Mesh.for_config(config)
    other = meshlib.AsyncClient(config=config)
    with meshlib.Client(config=config) as client:
        asgi = meshlib.ASGIMiddleware(_app, config=config)
        wsgi = meshlib.WSGIMiddleware(lambda environ, start: [], config=config)
        assert isinstance(client._transport, meshlib.MeshTransport)
        assert isinstance(other._transport, meshlib.AsyncMeshTransport)
        assert client._transport.mesh is shared
        assert other._transport.mesh is shared
        assert asgi.mesh is shared
        assert wsgi.mesh is shared
        assert asgi.instance is wsgi.instance is shared.instance  # one place in the catalog
    asyncio.run(other.aclose())
    assert live_meshes() == [shared]


def test_a_mesh_of_ones_own_is_shared_with_nobody_and_closing_it_ends_what_it_owned(
    tmp_path: Path,
) -> None:
    LocalCA(tmp_path).init("meshlib.test")
    config = load_config(
        {
            "MESH_SERVICE_NAME": "hello",
            "MESH_TLS": "strict",
            "MESH_TLS_CA": "local",
            "MESH_TLS_DIR": str(tmp_path),
            "MESH_STATIC_SERVICES": "a=1.2.3.4:80",
        }
    )
    renewing = _threads("meshlib-tls")
    with meshlib.Mesh(config) as mesh:
        assert mesh is not Mesh.for_config(config)  # for_config made the shared one
        assert _threads("meshlib-tls") == renewing + 2  # its leaf and the shared mesh's
        middleware = meshlib.ASGIMiddleware(_app, mesh=mesh)
        with meshlib.Client(mesh=mesh) as client:
            assert isinstance(client._transport, meshlib.MeshTransport)
            assert client._transport.mesh is mesh
        assert middleware.instance is mesh.instance
        assert mesh in live_meshes()
    assert mesh not in live_meshes()
    assert middleware.instance.stopped
    assert _threads("meshlib-tls") == renewing + 1  # the shared mesh's still renews
    for shared in live_meshes():
        shared.close()
    assert _threads("meshlib-tls") == renewing
    assert Mesh.for_config(config) is not shared  # a closed mesh is not handed out again


def test_a_bad_value_stops_a_mesh_before_it_starts_anything(tmp_path: Path) -> None:
    LocalCA(tmp_path).init("meshlib.test")
    renewing = _threads("meshlib-tls")
    config = load_config(
        {
            "MESH_SERVICE_NAME": "hello",
            "MESH_TLS": "strict",
            "MESH_TLS_CA": "local",
            "MESH_TLS_DIR": str(tmp_path),
        }
    )
    # a file that went away between reading the environment and starting the mesh
    config = dataclasses.replace(config, config_file=str(tmp_path / "gone.json"))
    with pytest.raises(meshlib.ConfigError, match="MESH_CONFIG_FILE="):
        meshlib.Mesh(config)
    assert _threads("meshlib-tls") == renewing  # the leaf it had issued stopped renewing
    assert live_meshes() == []


def test_a_server_that_never_calls_out_starts_no_discovery(
    consul: ConsulAgent, backends: BackendFactory, registered: list[str]
) -> None:
    service = unique("wx")
    backend = backends()
    register(consul, service, f"{service}-1", backend.port, ids=registered)
    config = load_config({"MESH_SERVICE_NAME": "hello", "CONSUL_HTTP_ADDR": consul.http_addr})
    engines = _threads("meshlib-consul")
    middleware = meshlib.ASGIMiddleware(_app, config=config)
    assert _threads("meshlib-consul") == engines  # no watch, not even service-defaults
    with meshlib.Client(mesh=middleware.mesh) as client:
        assert client.get(f"http://{service}/whoami").status_code == 200
    assert _threads("meshlib-consul") == engines + 1
    middleware.mesh.close()
    wait_until(lambda: _threads("meshlib-consul") == engines, what="the engine to stop")


def test_a_forked_worker_starts_discovery_of_its_own(
    consul: ConsulAgent, backends: BackendFactory, registered: list[str]
) -> None:
    # A pre-forking server builds its app (and so its mesh) before the fork; threads do not
    # follow a fork, so a worker that kept its parent's discovery never heard of a change.
    first, later = unique("wx"), unique("wx")
    backend = backends()
    register(consul, first, f"{first}-1", backend.port, ids=registered)
    config = load_config({"CONSUL_HTTP_ADDR": consul.http_addr, "MESH_DISCOVERY_TIMEOUT": "5s"})
    with meshlib.Client(config=config) as client:
        assert client.get(f"http://{first}/whoami").status_code == 200
        register(consul, later, f"{later}-1", backend.port, ids=registered)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: report and leave at once, whatever happens
            code = 1
            try:
                code = 0 if client.get(f"http://{later}/whoami").status_code == 200 else 2
            except BaseException as exc:
                os.write(write, repr(exc).encode()[:500])
            finally:
                os._exit(code)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as reader:
            said = reader.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, said


def test_the_process_mesh_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_STATIC_SERVICES", "a=127.0.0.1:9")
    with meshlib.Client() as client:
        assert isinstance(client._transport, meshlib.MeshTransport)
        mesh = client._transport.mesh
    monkeypatch.setenv("MESH_STATIC_SERVICES", "a=127.0.0.1:10")
    with meshlib.Client() as client:
        assert isinstance(client._transport, meshlib.MeshTransport)
        assert client._transport.mesh is not mesh  # another configuration, another mesh
    with pytest.raises(httpx.ConnectError), meshlib.Client(mesh=mesh) as client:
        client.get("http://a/")


def test_each_mesh_labels_its_calls_with_its_own_service() -> None:
    # telemetry's process-wide state named one caller for all: the last configuration's
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"source": request.headers.get("x-mesh-source")})

    configs = {
        name: load_config({"MESH_SERVICE_NAME": name, "MESH_STATIC_SERVICES": "ledger=1:80"})
        for name in ("billing", "checkout")
    }
    meshes = {name: meshlib.Mesh(config) for name, config in configs.items()}  # both first
    seen = {}
    for name, mesh in meshes.items():
        with meshlib.Client(transport=httpx.MockTransport(answer), mesh=mesh) as client:
            seen[name] = client.get("http://ledger/").json()["source"]
        mesh.close()
    assert seen == {"billing": "billing", "checkout": "checkout"}
    counted = [
        line
        for line in prometheus_text().splitlines()
        if line.startswith("http_client_request_duration_seconds_count{")
        and 'service_peer_name="ledger"' in line
    ]
    assert len(counted) == 2, counted
    assert any('service_name="billing"' in line for line in counted), counted
    assert any('service_name="checkout"' in line for line in counted), counted
