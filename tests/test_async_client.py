"""The async mesh client: the same policies as the sync one, under concurrency."""

from __future__ import annotations

import time
from collections import Counter

import anyio
import httpx
import pytest

import meshlib
from backends import BackendFactory, static_env

pytestmark = pytest.mark.anyio


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("MESH_RETRY_BACKOFF", "5ms")
    monkeypatch.setenv("MESH_RETRY_BACKOFF_MAX", "20ms")
    return monkeypatch


async def test_async_round_robin_is_exact_under_concurrency(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    servers = backends.many(3)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", servers))
    env.setenv("MESH_LB", "round_robin")
    counts: Counter[str] = Counter()
    async with meshlib.AsyncClient() as client:

        async def worker() -> None:
            for _ in range(30):
                response = await client.get("http://weather/whoami")
                counts[response.text] += 1

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(worker)
    assert counts == {"b0": 100, "b1": 100, "b2": 100}


async def test_async_p2c_ewma_avoids_a_slow_instance(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    servers = backends.many(3)
    servers[2].set_mode(delay_ms=150)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", servers))
    counts: Counter[str] = Counter()
    async with meshlib.AsyncClient() as client:

        async def worker() -> None:
            for _ in range(50):
                counts[(await client.get("http://weather/whoami")).text] += 1

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(worker)
    assert counts["b2"] < 0.1 * 200, counts


async def test_async_a_refused_connection_ejects_the_instance_at_once(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    """anyio reports a refused connection as "All connection attempts failed": it is still
    news, and the killed instance leaves the rotation at once."""
    servers = backends.many(2)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", servers))
    async with meshlib.AsyncClient() as client:
        warm = [(await client.get("http://weather/whoami")).text for _ in range(40)]
        assert set(warm) == {"b0", "b1"}, Counter(warm)
        servers[0].kill()
        after = [await client.get("http://weather/whoami") for _ in range(50)]
    assert all(r.text == "b1" for r in after)
    attempts = [r.extensions["meshlib"].attempts for r in after]
    assert attempts.count(2) <= 2, attempts


async def test_async_killed_instance_loses_no_gets_and_is_readmitted(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    servers = backends.many(3)
    victim = servers[0]
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", servers))
    env.setenv("MESH_OUTLIER_CONSECUTIVE_ERRORS", "2")
    env.setenv("MESH_OUTLIER_EJECTION_TIME", "1s")
    env.setenv("MESH_LB", "round_robin")
    served: list[str] = []
    failures: list[BaseException] = []
    async with meshlib.AsyncClient() as client:
        stop = anyio.Event()

        async def worker() -> None:
            for _ in range(5000):
                if stop.is_set():
                    return
                try:
                    served.append((await client.get("http://weather/whoami")).text)
                except Exception as exc:
                    failures.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(worker)
            await _until(lambda: served.count("b0") >= 20)
            await anyio.to_thread.run_sync(victim.kill)
            killed_at = len(served)
            await _until(lambda: len(served) > killed_at + 300)
            assert "b0" not in served[killed_at + 40 : killed_at + 300]
            await anyio.to_thread.run_sync(victim.start)
            restarted_at = len(served)
            await _until(lambda: "b0" in served[restarted_at:])
            stop.set()
    assert failures == []


async def test_async_post_semantics(backends: BackendFactory, env: pytest.MonkeyPatch) -> None:
    dead, alive = backends.many(2)
    dead.kill()
    env.setenv("MESH_STATIC_SERVICES", static_env("orders", [dead, alive]))
    env.setenv("MESH_LB", "round_robin")
    async with meshlib.AsyncClient() as client:
        responses = [await client.post("http://orders/echo", json={"n": i}) for i in range(10)]
        assert [r.status_code for r in responses] == [200] * 10
        assert alive.stats()["POST"] == 10  # connect failures retried, each POST sent once

        alive.set_mode(status=503)
        response = await client.post("http://orders/echo", content=b"x")
        assert response.status_code == 503
        assert alive.stats()["POST"] == 11  # a 503 on a POST is not retried


async def test_async_whole_service_down_breaker_fails_fast(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    servers = backends.many(2)
    for server in servers:
        server.kill()
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", servers))
    env.setenv("MESH_BREAKER_FAILURES", "5")
    env.setenv("MESH_BREAKER_RESET", "30s")
    env.setenv("MESH_RETRY_MIN_PER_SECOND", "0")
    async with meshlib.AsyncClient() as client:
        errors: Counter[str] = Counter()
        started = time.monotonic()
        for _ in range(100):
            try:
                await client.get("http://weather/whoami")
            except meshlib.CircuitOpen:
                errors["open"] += 1
            except httpx.ConnectError:
                errors["connect"] += 1
        elapsed = time.monotonic() - started
    assert errors["open"] >= 95
    assert errors["open"] + errors["connect"] == 100
    assert elapsed < 5


async def test_async_deadline(backends: BackendFactory, env: pytest.MonkeyPatch) -> None:
    server = backends("slow")
    server.set_mode(delay_ms=2000)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    env.setenv("MESH_DEADLINE", "300ms")
    async with meshlib.AsyncClient() as client:
        with pytest.raises(meshlib.DeadlineExceeded):
            await client.get("http://weather/whoami")


async def test_async_streaming_and_hooks(backends: BackendFactory, env: pytest.MonkeyPatch) -> None:
    server = backends("a")
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    seen: list[int] = []

    async def hook(response: httpx.Response) -> None:
        seen.append(response.status_code)

    async with (
        meshlib.AsyncClient(event_hooks={"response": [hook]}) as client,
        client.stream("GET", "http://weather/whoami") as response,
    ):
        assert b"".join([chunk async for chunk in response.aiter_bytes()]) == b"a"
    assert seen == [200]
    assert isinstance(client, httpx.AsyncClient)


async def _until(predicate: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        await anyio.sleep(0.01)


async def test_async_cookies_a_service_sets_are_kept_and_sent_back(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    server = backends("a")
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    async with meshlib.AsyncClient() as client:
        await client.get("http://weather/whoami")
        assert not client.cookies
        await client.get("http://weather/set-cookie?session=abc")
        assert client.cookies.get("session") == "abc"
        echoed = (await client.get("http://weather/echo")).json()
        assert echoed["headers"]["cookie"] == "session=abc"
