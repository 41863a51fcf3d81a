"""Hedged requests against real backends: one instance held by the test, one fast.

The slow instance holds every request until the test releases it (``hold`` mode of
tests/backend_server.py), so "the hedge answered first" is proven by the slow one still
holding its request when the answer arrives, never by a wall-clock threshold. Every test
runs with ``Client`` and with ``AsyncClient`` (driven through an anyio portal, so both read
the same).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

import meshlib
from backends import Backend, BackendFactory, static_env
from meshlib import client as client_module
from meshlib._config import load_config
from meshlib.security import LocalCA
from meshlib.telemetry import prometheus_text
from meshlib.telemetry._metrics import REGISTRY
from polling import wait_until
from served import ServedFactory

WEATHER = {"service_peer_name": "weather"}


@pytest.fixture(autouse=True)
def _fresh_metrics() -> Iterator[None]:
    REGISTRY.reset()
    yield
    REGISTRY.reset()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("MESH_RETRY_BACKOFF", "5ms")
    monkeypatch.setenv("MESH_RETRY_BACKOFF_MAX", "20ms")
    # Smooth round robin over [slow, fast] picks slow, fast, slow, ...: every other request
    # starts on the slow instance, and its hedge can only go to the fast one.
    monkeypatch.setenv("MESH_LB", "round_robin")
    return monkeypatch


@pytest.fixture
def pair(backends: BackendFactory, env: pytest.MonkeyPatch) -> tuple[Backend, Backend]:
    slow, fast = backends("slow"), backends("fast")
    slow.set_mode(hold=True)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [slow, fast]))
    return slow, fast


class Mesh:
    """``Client`` or ``AsyncClient`` behind one blocking interface."""

    def __init__(self, kind: str, portal: BlockingPortal | None) -> None:
        self.kind = kind
        self.portal = portal
        self.sync: meshlib.Client | None = None
        self.aio: meshlib.AsyncClient | None = None
        if portal is None:
            self.sync = meshlib.Client()
        else:
            self.aio = portal.call(_make_async_client)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if self.sync is not None:
            return self.sync.request(method, url, **kwargs)
        assert self.portal is not None
        assert self.aio is not None
        return self.portal.call(partial(self.aio.request, method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def stream_text(self, url: str) -> tuple[str, httpx.Response]:
        if self.sync is not None:
            with self.sync.stream("GET", url) as response:
                return response.read().decode(), response
        assert self.portal is not None
        assert self.aio is not None
        return self.portal.call(_stream_text, self.aio, url)

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
        if self.aio is not None and self.portal is not None:
            self.portal.call(self.aio.aclose)


async def _make_async_client() -> meshlib.AsyncClient:
    return meshlib.AsyncClient()


async def _stream_text(client: meshlib.AsyncClient, url: str) -> tuple[str, httpx.Response]:
    async with client.stream("GET", url) as response:
        return (await response.aread()).decode(), response


@pytest.fixture(params=["sync", "async"])
def mesh(request: pytest.FixtureRequest) -> Callable[[], Any]:
    """``with mesh() as client:`` -- a mesh client of the parametrized kind."""

    @contextmanager
    def make() -> Iterator[Mesh]:
        if request.param == "sync":
            client = Mesh("sync", None)
            try:
                yield client
            finally:
                client.close()
            return
        with start_blocking_portal("asyncio") as portal:
            client = Mesh("async", portal)
            try:
                yield client
            finally:
                client.close()

    return make


def samples(name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in prometheus_text().splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def release(backend: Backend) -> None:
    httpx.post(f"{backend.url}/admin/release", timeout=5).raise_for_status()


def open_connections(port: int) -> int:
    """Established TCP connections to 127.0.0.1:``port`` (the clients' side), from the kernel."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


@contextmanager
def in_background(job: Callable[[], None]) -> Iterator[None]:
    """Run ``job`` on a thread during the block; its failure fails the test."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(30)
    if errors:
        raise errors[0]


def held(backend: Backend, key: str = "held") -> int:
    return int(backend.stats().get(key, 0))


# ----------------------------------------------------------------------------- settings


def test_hedging_is_off_by_default_and_set_per_service() -> None:
    assert load_config({}).policy("weather").hedge_delay == 0.0
    config = load_config({"MESH_HEDGE_DELAY": "50ms", "MESH_HEDGE_DELAY__FORECAST": "off"})
    assert config.policy("weather").hedge_delay == 0.05
    assert config.policy("forecast").hedge_delay == 0.0


# ----------------------------------------------------------------------------- the race


def test_the_hedge_answers_while_the_slow_instance_still_holds_the_first_attempt(
    pair: tuple[Backend, Backend], env: pytest.MonkeyPatch, mesh: Callable[[], Any]
) -> None:
    slow, fast = pair
    # long enough that the fast instance always answers its own requests before it (so
    # exactly the requests that start on the slow one are hedged), even on a busy machine
    env.setenv("MESH_HEDGE_DELAY", "100ms")
    with mesh() as client:
        responses = [client.get("http://weather/whoami") for _ in range(6)]
        # Every answer came from the fast instance while the slow one was still holding
        # the requests that started there: nobody waited for it.
        assert [r.text for r in responses] == ["fast"] * 6
        reasons = [r.extensions["meshlib"].retry_reasons for r in responses]
        assert reasons == [["hedge"], [], ["hedge"], [], ["hedge"], []]
        assert [r.extensions["meshlib"].attempts for r in responses] == [2, 1, 2, 1, 2, 1]
        assert {r.extensions["meshlib"].endpoint for r in responses} == {fast.address}
        assert held(slow) == 3
        assert held(slow, "released") == 0
        assert fast.stats()["GET"] == 6
        if client.kind == "async":
            # the loser's task was cancelled, and httpcore closed its connection at once
            wait_until(lambda: held(slow, "disconnected") == 3, timeout=10, what="cancelled")
            assert open_connections(slow.port) == 0
        else:
            # the loser is abandoned: blocked until the slow instance answers, then closed
            assert open_connections(slow.port) == 3
            release(slow)
            wait_until(lambda: held(slow, "released") == 3, timeout=10, what="released")
            wait_until(lambda: open_connections(slow.port) == 0, timeout=10, what="closed")
    assert samples("meshlib_client_retries_total", **WEATHER, meshlib_retry_reason="hedge") == 3


def test_a_hedge_answered_503_is_set_aside_while_the_first_attempt_can_still_win(
    pair: tuple[Backend, Backend], env: pytest.MonkeyPatch, mesh: Callable[[], Any]
) -> None:
    slow, fast = pair
    fast.set_mode(status=503)
    env.setenv("MESH_HEDGE_DELAY", "10ms")

    def release_after_the_503() -> None:
        wait_until(lambda: fast.stats().get("GET") == 1, timeout=10, what="the hedge's 503")
        release(slow)

    with mesh() as client, in_background(release_after_the_503):
        response = client.get("http://weather/whoami")
    assert (response.status_code, response.text) == (200, "slow")
    info = response.extensions["meshlib"]
    assert (info.endpoint, info.attempts, info.retry_reasons) == (slow.address, 2, ["hedge"])
    assert fast.stats()["GET"] == 1  # the 503 was not retried: the first attempt answered


def test_a_streamed_response_is_won_by_the_first_to_send_headers(
    pair: tuple[Backend, Backend], env: pytest.MonkeyPatch, mesh: Callable[[], Any]
) -> None:
    slow, _ = pair
    env.setenv("MESH_HEDGE_DELAY", "10ms")
    with mesh() as client:
        text, response = client.stream_text("http://weather/whoami")
        assert text == "fast"
        assert response.extensions["meshlib"].retry_reasons == ["hedge"]
        release(slow)


def test_over_mtls_the_hedge_proves_the_right_identity_on_its_own_connection(
    serve: ServedFactory,
    tmp_path: Path,
    env: pytest.MonkeyPatch,
    mesh: Callable[[], Any],
) -> None:
    ca_dir = tmp_path / "ca"
    LocalCA(ca_dir).init("meshlib.test")
    served = serve(
        "fastapi_app:app",
        {
            "MESH_TLS": "strict",
            "MESH_TLS_CA": "local",
            "MESH_TLS_DIR": str(ca_dir),
            "MESH_SERVICE_NAME": "hello",
        },
    )
    # The first endpoint accepts TCP connections and never answers a TLS handshake.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        mute_port = mute.getsockname()[1]
        env.setenv("MESH_TLS", "strict")
        env.setenv("MESH_TLS_CA", "local")
        env.setenv("MESH_TLS_DIR", str(ca_dir))
        env.setenv("MESH_SERVICE_NAME", "gateway")
        env.setenv("MESH_STATIC_SERVICES", f"hello=127.0.0.1:{mute_port},127.0.0.1:{served.port}")
        env.setenv("MESH_HEDGE_DELAY", "50ms")
        with mesh() as client:
            response = client.get("http://hello/peer", extensions={"meshlib": {"deadline": 3.0}})
    assert response.status_code == 200
    assert response.json()["peer"] == "spiffe://meshlib.test/ns/default/dc/dc1/svc/gateway"
    info = response.extensions["meshlib"]
    assert (info.endpoint, info.retry_reasons) == (served.address, ["hedge"])
    assert response.request.url == "http://hello/peer"


# ----------------------------------------------------------------------------- who may hedge


def test_a_post_is_never_hedged_unless_it_carries_an_idempotency_key(
    pair: tuple[Backend, Backend], env: pytest.MonkeyPatch, mesh: Callable[[], Any]
) -> None:
    slow, fast = pair
    env.setenv("MESH_HEDGE_DELAY", "10ms")
    with mesh() as client:
        # The POST starts on the slow instance and waits there for its whole deadline,
        # 30 times the hedge delay: a hedge would have been sent long before.
        with pytest.raises(httpx.TimeoutException):
            client.post(
                "http://weather/echo", content=b"order", extensions={"meshlib": {"deadline": 0.3}}
            )
        assert client.get("http://weather/whoami").text == "fast"  # round robin: fast's turn
        keyed = client.post(
            "http://weather/echo", content=b"order", headers={"Idempotency-Key": "order-1"}
        )
        assert keyed.json()["instance"] == "fast"
        assert keyed.extensions["meshlib"].retry_reasons == ["hedge"]
        assert keyed.json()["body_length"] == 5  # the hedge sent the same body
        release(slow)
    assert slow.stats()["POST"] == 2
    assert fast.stats()["POST"] == 1  # only the keyed one


def test_the_hedge_option_turns_hedging_on_and_off_per_request(
    pair: tuple[Backend, Backend], env: pytest.MonkeyPatch, mesh: Callable[[], Any]
) -> None:
    slow, fast = pair
    with mesh() as client:
        on = client.get("http://weather/whoami", extensions={"meshlib": {"hedge": 0.01}})
        assert (on.text, on.extensions["meshlib"].retry_reasons) == ("fast", ["hedge"])
        assert client.get("http://weather/whoami").text == "fast"
        with pytest.raises(ValueError, match="'hedge' must be a delay in seconds or False"):
            client.get("http://weather/whoami", extensions={"meshlib": {"hedge": "50ms"}})
    env.setenv("MESH_HEDGE_DELAY__WEATHER", "10ms")
    with mesh() as client:
        with pytest.raises(httpx.TimeoutException):  # held for the whole deadline, unhedged
            client.get(
                "http://weather/whoami", extensions={"meshlib": {"hedge": False, "deadline": 0.3}}
            )
        release(slow)
    assert fast.stats()["GET"] == 2


def test_an_exhausted_retry_budget_sends_no_hedge_and_says_so(
    pair: tuple[Backend, Backend], env: pytest.MonkeyPatch, mesh: Callable[[], Any]
) -> None:
    slow, fast = pair
    env.setenv("MESH_HEDGE_DELAY", "10ms")
    env.setenv("MESH_RETRY_BUDGET", "0")
    env.setenv("MESH_RETRY_MIN_PER_SECOND", "0")
    refused = partial(samples, "meshlib_client_retry_budget_exhausted_total", **WEATHER)

    def release_once_refused() -> None:
        wait_until(lambda: refused() == 1, timeout=10, what="the refused hedge")
        release(slow)

    with mesh() as client, in_background(release_once_refused):
        response = client.get("http://weather/whoami")
    # no hedge: the request waited for the slow instance, which answered once released
    assert response.text == "slow"
    assert response.extensions["meshlib"].retry_reasons == []
    assert fast.stats().get("GET", 0) == 0
    assert refused() == 1
    assert samples("meshlib_client_retries_total", **WEATHER) == 0


# ----------------------------------------------------------------------------- the loser


def test_the_loser_is_not_ejected_and_the_breaker_hears_one_success(
    pair: tuple[Backend, Backend], env: pytest.MonkeyPatch, mesh: Callable[[], Any]
) -> None:
    slow, _fast = pair
    env.setenv("MESH_HEDGE_DELAY", "50ms")
    env.setenv("MESH_OUTLIER_CONSECUTIVE_ERRORS", "1")  # one failure would eject
    env.setenv("MESH_BREAKER_FAILURES", "1")  # one failed request would open the breaker
    with mesh() as client:
        assert [client.get("http://weather/whoami").text for _ in range(4)] == ["fast"] * 4
        slow.set_mode(hold=False)
        release(slow)
        losers = held(slow)
        assert losers >= 2
        wait_until(
            lambda: held(slow, "released") + held(slow, "disconnected") == losers, timeout=10
        )
        assert samples("meshlib_client_ejections_total", **WEATHER) == 0
        assert samples("meshlib_client_breaker_state", meshlib_breaker_state="closed") == 1
        # the slow instance keeps its turn in load balancing (unhedged, so that a slow
        # first answer on a new connection cannot lose a race and hide it)
        unhedged = {"meshlib": {"hedge": False}}
        later = [client.get("http://weather/whoami", extensions=unhedged).text for _ in range(4)]
    assert sorted(later) == ["fast", "fast", "slow", "slow"]
    assert samples("meshlib_client_endpoints", **WEATHER, meshlib_endpoint_state="ejected") == 0


def test_the_deadline_bounds_a_hedged_request_and_fails_it_once(
    backends: BackendFactory, env: pytest.MonkeyPatch, mesh: Callable[[], Any]
) -> None:
    first, second = backends("first"), backends("second")
    for backend in (first, second):
        backend.set_mode(hold=True)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [first, second]))
    env.setenv("MESH_HEDGE_DELAY", "10ms")
    env.setenv("MESH_BREAKER_FAILURES", "1")
    with mesh() as client:
        with pytest.raises(meshlib.DeadlineExceeded):
            client.get("http://weather/whoami", extensions={"meshlib": {"deadline": 0.3}})
        assert (held(first), held(second)) == (1, 1)  # the first attempt and its hedge
        assert samples("meshlib_client_breaker_state", meshlib_breaker_state="open") == 1
        for backend in (first, second):
            release(backend)


def test_many_hedged_requests_leave_no_connection_behind(
    pair: tuple[Backend, Backend], env: pytest.MonkeyPatch, mesh: Callable[[], Any]
) -> None:
    slow, fast = pair
    env.setenv("MESH_HEDGE_DELAY", "20ms")
    with mesh() as client:
        responses = [client.get("http://weather/whoami") for _ in range(40)]
        assert {r.text for r in responses} == {"fast"}
        losers = held(slow)
        assert losers >= 20  # (a slow answer from the fast one may be hedged to slow too)
        assert open_connections(fast.port) <= 2  # the fast one's connection is reused
        if client.kind == "sync":
            assert open_connections(slow.port) == losers  # abandoned, until slow answers
            release(slow)
        wait_until(lambda: open_connections(slow.port) == 0, timeout=15, what="losers closed")
        assert open_connections(fast.port) <= 2
        assert samples("meshlib_client_requests_in_flight", **WEATHER) == 0


def test_sync_hedges_stop_while_too_many_losers_are_still_blocked(
    pair: tuple[Backend, Backend], env: pytest.MonkeyPatch
) -> None:
    slow, _ = pair
    env.setenv("MESH_HEDGE_DELAY", "50ms")
    env.setattr(client_module, "_MAX_ABANDONED", 2)
    wait_until(lambda: client_module._WORKERS.abandoned == 0, timeout=15, what="earlier losers")

    def release_the_unhedged_one() -> None:
        wait_until(lambda: held(slow) == 3, timeout=10, what="the fifth request, on slow")
        release(slow)

    with meshlib.Client() as client:
        first = [client.get("http://weather/whoami") for _ in range(4)]
        assert [r.text for r in first] == ["fast"] * 4  # two hedges won, two losers left
        with in_background(release_the_unhedged_one):
            fifth = client.get("http://weather/whoami")
        # two losers still blocked: no hedge, so the request waited for the slow instance
        assert (fifth.text, fifth.extensions["meshlib"].retry_reasons) == ("slow", [])
        wait_until(lambda: open_connections(slow.port) == 0, timeout=10, what="losers closed")
        wait_until(lambda: client_module._WORKERS.abandoned == 0, timeout=10)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_a_forked_child_hedges_on_threads_of_its_own(
    pair: tuple[Backend, Backend], env: pytest.MonkeyPatch
) -> None:
    slow, _ = pair
    env.setenv("MESH_HEDGE_DELAY", "50ms")
    with meshlib.Client() as client:
        assert client.get("http://weather/whoami").text == "fast"  # hedged: a worker is idle
    pid = os.fork()
    if pid == 0:  # the child, as a worker of a pre-forking server
        code = 1
        try:
            with meshlib.Client() as client:
                # round robin's next turn is the fast instance: answered by the first
                # attempt, if a worker thread of the child's own runs it
                options = {"meshlib": {"hedge": 1.0, "deadline": 3.0}}
                response = client.get("http://weather/whoami", extensions=options)
                reasons = response.extensions["meshlib"].retry_reasons
                code = 0 if (response.text, reasons) == ("fast", []) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    release(slow)
    assert os.waitstatus_to_exitcode(status) == 0


_TRACED = """
import json, httpx, meshlib
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
memory = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(memory))
trace.set_tracer_provider(provider)
with meshlib.Client() as client:
    assert client.get("http://weather/whoami").text == "fast"
spans = [
    {"name": s.name, "status": s.status.status_code.name, **dict(s.attributes or {})}
    for s in memory.get_finished_spans()
]
print(json.dumps(spans))
"""


def test_attempt_spans_mark_the_hedge_and_the_cancelled_loser(
    pair: tuple[Backend, Backend],
) -> None:
    slow, fast = pair
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MESH_"))}
    env = {
        **clean,
        "MESH_STATIC_SERVICES": static_env("weather", [slow, fast]),
        "MESH_LB": "round_robin",
        "MESH_HEDGE_DELAY": "10ms",
    }
    result = subprocess.run(
        [sys.executable, "-c", _TRACED], env=env, capture_output=True, text=True, timeout=60
    )
    release(slow)
    assert result.returncode == 0, result.stderr
    spans = json.loads(result.stdout)
    attempts = sorted(
        (s for s in spans if s["name"] == "GET weather attempt"), key=lambda s: s["meshlib.attempt"]
    )
    first, hedge = attempts
    assert first["server.port"] == slow.port
    assert first["meshlib.attempt.cancelled"] is True
    assert first["status"] == "UNSET"  # cancelled is not failed
    assert "error.type" not in first
    assert hedge["server.port"] == fast.port
    assert hedge["meshlib.retry.reason"] == "hedge"
    assert hedge["http.request.resend_count"] == 1
    assert hedge["http.response.status_code"] == 200
    (call,) = (s for s in spans if s["name"] == "GET weather")
    assert call["meshlib.attempts"] == 2


# ----------------------------------------------------------------------------- cancellation


def test_an_async_request_cancelled_by_its_caller_leaves_nothing_in_flight(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    slow = backends("slow")
    slow.set_mode(hold=True)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [slow]))

    async def cancel_while_held(hedge: float | bool) -> None:
        async with meshlib.AsyncClient() as client, anyio.create_task_group() as tasks:
            options = {"meshlib": {"hedge": hedge}}
            tasks.start_soon(partial(client.get, "http://weather/whoami", extensions=options))
            while await anyio.to_thread.run_sync(held, slow) < expected:
                await anyio.sleep(0.01)
            tasks.cancel_scope.cancel()

    expected = 1
    anyio.run(cancel_while_held, False)  # not hedged
    assert samples("meshlib_client_requests_in_flight", **WEATHER) == 0
    expected = 2
    anyio.run(cancel_while_held, 0.01)  # hedged (one endpoint: the hedge never starts)
    assert samples("meshlib_client_requests_in_flight", **WEATHER) == 0
    wait_until(lambda: held(slow, "disconnected") == 2, timeout=10)
