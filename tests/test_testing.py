"""meshlib.testing: fake services, faults, attempts, a pinned peer, the pytest plugin."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib._config import load_config
from meshlib.testing import Answer, FakeMesh, Received, pinned_peer

ROOT = Path(__file__).parent.parent


def test_a_fake_answers_and_a_reset_is_retried_on_the_next_attempt() -> None:
    with FakeMesh() as mesh:
        forecast = mesh.service("forecast", Answer(json={"summary": "sunny"}))
        forecast.fault(reset=True, times=1)
        with mesh.client() as client:
            r = client.get("http://forecast/forecast")
        assert r.json() == {"summary": "sunny"}
        assert r.extensions["meshlib"].attempts == 2
        assert [a.path for a in forecast.attempts] == ["/forecast", "/forecast"]


def test_an_abort_and_a_handler_see_the_request() -> None:
    def echo(received: Received) -> Answer:
        return Answer(json={"user": received.headers.get("x-user")})

    with FakeMesh() as mesh:
        geo = mesh.service("geo", echo)
        geo.fault(abort=500, times=1)
        with mesh.client() as client:
            assert client.get("http://geo/").status_code == 500  # 500 is not retried
            assert client.get("http://geo/", headers={"x-user": "ada"}).json() == {"user": "ada"}


@pytest.mark.anyio
async def test_a_pinned_peer_is_the_caller_inbound_authorization_judges() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    config = load_config({"MESH_ALLOWED_CALLERS": "web"})
    guarded = meshlib.ASGIMiddleware(app, config=config)
    for caller, status in (("web", 200), ("batch", 403)):
        transport = httpx.ASGITransport(app=pinned_peer(guarded, caller))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            assert (await client.get("/")).status_code == status


def test_the_worked_example_in_docs_testing_md_passes(tmp_path: Path) -> None:
    """The page's example, as it stands, with the plugin pytest loads from meshlib."""
    text = (ROOT / "docs" / "testing.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    example = tmp_path / "test_gateway_example.py"
    example.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))}
    env["PYTHONPATH"] = str(ROOT / "examples" / "fastapi_weather")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(example)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
