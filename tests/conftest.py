from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshlib._runtime import live_meshes
from meshlib.telemetry import _admin

pytest_plugins = ["missing_tools", "backends", "consul_agent", "consul_cluster", "served"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _fresh_mesh_runtime() -> Iterator[None]:
    """Each test gets its own process meshes (ejections, budgets, watches, instance):
    those the test's clients and middlewares shared are closed after it."""
    yield
    for mesh in live_meshes():
        mesh.close()
    _admin.stop_admin()


@pytest.fixture(autouse=True)
def _no_mesh_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from an environment without MESH_*/CONSUL_* values of the machine's."""
    import os

    for name in list(os.environ):
        if name.startswith(("MESH_", "CONSUL_")) and not name.startswith("MESH_TEST_"):
            monkeypatch.delenv(name)
