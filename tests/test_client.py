"""The outbound mesh client against real backend processes (static discovery).

Each scenario asserts on what a user sees (statuses, errors, which instance answered)
and on what the servers themselves counted.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import pytest

import meshlib
from backends import Backend, BackendFactory, static_env
from polling import wait_until


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Fast resilience settings for tests; each test adds what it needs."""
    monkeypatch.setenv("MESH_RETRY_BACKOFF", "5ms")
    monkeypatch.setenv("MESH_RETRY_BACKOFF_MAX", "20ms")
    return monkeypatch


def instances(responses: list[httpx.Response]) -> Counter[str]:
    return Counter(r.headers["x-instance"] for r in responses)


# ----------------------------------------------------------------------------- routing


def test_round_robin_distribution_is_exact(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    servers = backends.many(3)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", servers))
    env.setenv("MESH_LB", "round_robin")
    with meshlib.Client() as client:
        responses = [client.get("http://weather/whoami") for _ in range(300)]
    assert all(r.status_code == 200 for r in responses)
    assert instances(responses) == {"b0": 100, "b1": 100, "b2": 100}
    assert [s.stats()["GET"] for s in servers] == [100, 100, 100]


def test_weights_are_honoured(backends: BackendFactory, env: pytest.MonkeyPatch) -> None:
    heavy, light = backends.many(2)
    env.setenv("MESH_STATIC_SERVICES", f"weather={heavy.address}*3,{light.address}")
    env.setenv("MESH_LB", "round_robin")
    with meshlib.Client() as client:
        responses = [client.get("http://weather/whoami") for _ in range(400)]
    assert instances(responses) == {"b0": 300, "b1": 100}


def test_p2c_ewma_moves_traffic_away_from_a_slow_instance(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    servers = backends.many(3)
    servers[2].set_mode(delay_ms=150)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", servers))
    with meshlib.Client() as client:
        responses = [client.get("http://weather/whoami") for _ in range(300)]
    counts = instances(responses)
    # The slow one is avoided. (How the two fast ones share is not P2C-EWMA's promise: at
    # light sequential load it prefers whichever measured faster.)
    assert counts["b2"] < 0.1 * 300, counts
    assert counts["b0"] + counts["b1"] > 0.9 * 300, counts


def test_ring_hash_sticks_one_user_to_one_instance(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    servers = backends.many(3)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", servers))
    env.setenv("MESH_LB", "ring_hash")
    env.setenv("MESH_LB_HASH_ON", "header:x-user")
    with meshlib.Client() as client:
        seen = {
            user: {
                client.get("http://weather/whoami", headers={"x-user": user}).text for _ in range(5)
            }
            for user in ("ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal")
        }
    assert all(len(names) == 1 for names in seen.values()), seen
    assert len({next(iter(names)) for names in seen.values()}) > 1, "every user on one instance"


def test_callee_sees_the_service_name_as_host_and_the_remaining_deadline(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    server = backends("a")
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    env.setenv("MESH_DEADLINE", "3s")
    with meshlib.Client() as client:
        response = client.get("http://weather/echo")
    headers = response.json()["headers"]
    assert headers["host"] == "weather"
    assert 2000 < int(headers["x-mesh-deadline-ms"]) <= 3000
    # the caller's request object is left as the caller made it
    assert response.request.url == "http://weather/echo"
    assert "x-mesh-deadline-ms" not in response.request.headers
    info = response.extensions["meshlib"]
    assert (info.service, info.endpoint, info.attempts) == ("weather", server.address, 1)


def test_cookies_a_service_sets_are_kept_and_sent_back_as_httpx_does(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    # The jar skips responses without Set-Cookie (client.py, _Cookies): those with it count
    server = backends("a")
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    with meshlib.Client() as client:
        client.get("http://weather/whoami")
        assert not client.cookies
        client.get("http://weather/set-cookie?session=abc")
        assert client.cookies.get("session") == "abc"
        assert client.get("http://weather/echo").json()["headers"]["cookie"] == "session=abc"
        client.cookies = {"theme": "dark"}  # replaced, as on httpx.Client
        client.get("http://weather/set-cookie?session=def")
        assert dict(client.cookies) == {"theme": "dark", "session": "def"}
        assert "theme=dark" in client.get("http://weather/echo").json()["headers"]["cookie"]


def test_service_consul_names_are_mesh_services_too(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    server = backends("a")
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    with meshlib.Client() as client:
        assert client.get("http://weather.service.consul/whoami").text == "a"
        with pytest.raises(meshlib.NoHealthyEndpoints, match="'ghost' is not registered"):
            client.get("http://ghost.service.consul/whoami")


def test_an_unknown_service_name_says_where_meshlib_looked(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    server = backends("a")
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    with meshlib.Client() as client, pytest.raises(meshlib.NoHealthyEndpoints) as caught:
        client.get("http://wether/whoami")  # a typo, and no such DNS name
    assert str(caught.value) == (
        "'wether' is not a mesh service (MESH_STATIC_SERVICES lists weather) and DNS does "
        "not know it either: check the name, or register the service"
    )
    assert isinstance(caught.value.__cause__, httpx.ConnectError)  # the DNS error, kept


def test_other_hosts_pass_through_untouched(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    server = backends("direct")
    env.setenv("MESH_STATIC_SERVICES", "weather=127.0.0.1:1")
    with meshlib.Client() as client:
        response = client.get(f"{server.url}/echo")
    assert response.json()["headers"]["host"] == server.address
    assert "x-mesh-deadline-ms" not in response.json()["headers"]
    assert "meshlib" not in response.extensions


# ----------------------------------------------------------------------------- failures


def test_each_ejection_and_readmission_is_one_log_line(
    backends: BackendFactory, env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshlib.resilience")
    good, bad = backends.many(2)
    bad.set_mode(status=500)
    # a service name of its own: the process's event log is rate-limited per service
    env.setenv("MESH_STATIC_SERVICES", static_env("ejecting", [good, bad]))
    env.setenv("MESH_LB", "round_robin")
    env.setenv("MESH_OUTLIER_CONSECUTIVE_ERRORS", "2")
    env.setenv("MESH_OUTLIER_EJECTION_TIME", "1s")

    def events(name: str) -> list[dict[str, object]]:
        return [
            r.meshlib_event  # type: ignore[attr-defined]
            for r in caplog.records
            if getattr(r, "meshlib_event", {}).get("event") == name
        ]

    with meshlib.Client() as client:
        wait_until(
            lambda: client.get("http://ejecting/").status_code and events("endpoint.ejected"),
            timeout=15,
            what="an ejection line",
        )
        bad.set_mode(status=None)  # it recovers; once its ejection is over it is used again
        wait_until(
            lambda: client.get("http://ejecting/").status_code and events("endpoint.readmitted"),
            timeout=15,
            what="a readmission line",
        )
    ejected = events("endpoint.ejected")
    assert len(ejected) == 1  # one line per ejection, not one per failed attempt
    assert ejected[0]["endpoint"] == bad.address
    assert ejected[0]["service"] == "ejecting"
    assert ejected[0]["last_error"] == "500"
    readmitted = events("endpoint.readmitted")
    assert len(readmitted) == 1
    assert readmitted[0]["endpoint"] == bad.address
    assert readmitted[0]["first_attempt"] == "succeeded"


def test_an_ejected_endpoint_that_answers_well_again_is_readmitted_at_once(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    from meshlib._runtime import live_meshes
    from meshlib._status import render, status_report

    only = backends("only")
    only.set_mode(status=500)
    env.setenv("MESH_STATIC_SERVICES", static_env("lonely", [only]))
    env.setenv("MESH_OUTLIER_CONSECUTIVE_ERRORS", "2")
    env.setenv("MESH_OUTLIER_EJECTION_TIME", "60s")
    with meshlib.Client() as client:
        for _ in range(2):
            assert client.get("http://lonely/whoami").status_code == 500
        (endpoint,) = status_report(live_meshes())["services"]["lonely"]["endpoints"]
        assert endpoint["ejected_for_s"] > 50  # ejected; still used (panic mode: no other)
        only.set_mode(status=None)
        assert client.get("http://lonely/whoami").status_code == 200
        report = status_report(live_meshes())
    (endpoint,) = report["services"]["lonely"]["endpoints"]
    assert endpoint["ejected_for_s"] == 0  # it answered well: not "ejected 59.9s" any more
    assert "1/1 usable" in render(report)


@pytest.mark.parametrize("lb", ["round_robin", "p2c_ewma"])
def test_killed_instance_loses_no_gets_is_ejected_and_readmitted(
    backends: BackendFactory, env: pytest.MonkeyPatch, lb: str
) -> None:
    servers = backends.many(3)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", servers))
    env.setenv("MESH_LB", lb)
    env.setenv("MESH_OUTLIER_CONSECUTIVE_ERRORS", "2")
    env.setenv("MESH_OUTLIER_EJECTION_TIME", "1s")
    failures: list[BaseException] = []
    served: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with meshlib.Client() as client:
            for _ in range(5000):  # bounded; normally ended by `stop`
                if stop.is_set():
                    return
                try:
                    served.append(client.get("http://weather/whoami").text)
                except Exception as exc:
                    failures.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        # the victim is the instance the balancer uses most: with P2C-EWMA an instance
        # whose first answer was slow (a cold start) can rightly go unused for a while
        wait_until(lambda: len(served) >= 60, timeout=30, what="traffic")
        busiest = Counter(served[-30:]).most_common(1)[0][0]
        victim = next(s for s in servers if s.name == busiest)
        victim.kill()
        killed_at = len(served)
        wait_until(lambda: len(served) > killed_at + 200, timeout=30, what="traffic after the kill")
        after_kill = served[killed_at + 20 : killed_at + 200]
        assert victim.name not in after_kill  # ejected: traffic went to the other two
        victim.start()
        restarted_at = len(served)
        wait_until(
            lambda: victim.name in served[restarted_at:], timeout=30, what="victim readmitted"
        )
    finally:
        stop.set()
        thread.join(30)
    assert failures == []


@pytest.mark.parametrize("lb", ["p2c_ewma", "least_request", "round_robin", "random", "ring_hash"])
def test_a_killed_instance_leaves_the_rotation_at_once_and_a_restarted_one_returns_within_2s(
    backends: BackendFactory, env: pytest.MonkeyPatch, lb: str
) -> None:
    """A refused connection is news: of the 50 requests after a kill -9 at most 2 make their
    first attempt on the dead instance (whatever the policy), and once it listens again on
    its port it serves within 2 s and gets its share back."""
    servers = backends.many(2)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", servers))
    env.setenv("MESH_LB", lb)
    if lb == "ring_hash":
        env.setenv("MESH_LB_HASH_ON", "header:x-user")
    sent = iter(range(1_000_000))

    def get(client: meshlib.Client) -> httpx.Response:
        return client.get("http://weather/whoami", headers={"x-user": f"u{next(sent)}"})

    with meshlib.Client() as client:
        warm = [get(client).text for _ in range(40)]
        assert set(warm) == {"b0", "b1"}, Counter(warm)
        victim = servers[0]
        victim.kill()
        after = [get(client) for _ in range(50)]
        assert all(r.status_code == 200 and r.text == "b1" for r in after)
        first_on_dead = [r.extensions["meshlib"].attempts for r in after].count(2)
        assert first_on_dead <= 2, [r.extensions["meshlib"].attempts for r in after]

        victim.start()
        ready = time.monotonic()
        back: list[str] = []
        while victim.name not in back:
            back.append(get(client).text)
            assert time.monotonic() - ready < 2.0, f"not back within 2 s: {Counter(back)}"
        # Its share back within 2 s, under a little concurrency: p2c_ewma spreads by load,
        # and sequential requests to two idle instances all go to whichever measured faster
        # last. A batch of 50 gives it at least a fifth. (On a loaded machine its first
        # answers after the restart can be slow, and the estimate takes a second or so to
        # forgive them: seen in CI, 7 of one batch of 200 taken at once.)
        back_at = time.monotonic()
        batches = []
        with ThreadPoolExecutor(4) as pool:
            while True:
                shares = Counter(pool.map(lambda _: get(client).text, range(50)))
                batches.append(shares[victim.name])
                if shares[victim.name] >= 10 or time.monotonic() - back_at > 2.0:
                    break
        assert shares[victim.name] >= 10, batches


def test_p2c_ewma_forgives_a_cold_start_within_seconds_but_not_a_slow_instance(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    """Slow start (``MESH_SLOW_START``, 10 s by default), under two threads of traffic.

    An instance restarted cold (its first 2 requests take 1.5 s, then it answers at once)
    serves 300 requests again within 30 s (5 to 15 s measured); before, its 1.5 s answer held
    its peak-EWMA estimate up for about a minute of decay (the test timed out). An
    instance restarted slow (every answer 300 ms) takes at most 2% of the 1,000 requests
    after its window, where its fair share is 25%.
    """
    servers = backends.many(4)
    cold, slow = servers[2], servers[3]
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", servers))
    served: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        with meshlib.Client() as client:
            while not stop.is_set():
                try:
                    served.append(client.get("http://weather/whoami").text)
                except Exception as exc:
                    failures.append(exc)

    def restart(backend: Backend, cold: str) -> float:
        backend.kill()
        backend.args = ["--cold", cold]
        backend.start()
        return time.monotonic()

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(served) >= 100, timeout=30, what="traffic")
        restart(cold, "2:1500")
        wait_until(
            lambda: cold.stats().get("GET", 0) >= 300, timeout=30, what="cold start forgiven"
        )

        window_over = restart(slow, "1000000:300") + 12  # its 10 s window, and some
        wait_until(lambda: slow.stats().get("GET", 0) >= 1, timeout=30, what="slow probed")
        # (a span of time, not a condition: its end is what is awaited)
        wait_until(lambda: time.monotonic() > window_over, timeout=30, what="window over")
        before, slow_before = len(served), slow.stats()["GET"]
        wait_until(lambda: len(served) >= before + 1000, timeout=60, what="traffic after it")
        slow_after, total_after = slow.stats()["GET"] - slow_before, len(served) - before
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert slow_after <= 0.02 * total_after, (slow_after, total_after)


def test_failing_fast_never_makes_an_instance_look_cheap_to_p2c_ewma(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    """An instance answering 503 in a millisecond is no faster to p2c_ewma than a healthy
    one taking 20 ms: it gets no more than its share of first attempts (before, all)."""
    failing, healthy = backends.many(2)
    failing.set_mode(status=503)
    healthy.set_mode(delay_ms=20)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [failing, healthy]))
    env.setenv("MESH_OUTLIER_CONSECUTIVE_ERRORS", "1000")  # ejection is not what is tested
    with meshlib.Client() as client:
        for _ in range(100):
            client.get("http://weather/whoami")
    first_on_failing = failing.stats()["GET"]
    assert first_on_failing <= 70, (first_on_failing, healthy.stats()["GET"])


def cutting(backends: BackendFactory, env: pytest.MonkeyPatch) -> tuple[Backend, Backend]:
    """Two instances of weather, round robin; the first cuts every response off mid-body."""
    cut, good = backends.many(2)
    cut.set_mode(cut=True)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [cut, good]))
    env.setenv("MESH_LB", "round_robin")
    return cut, good


def test_a_get_cut_off_mid_body_is_retried_on_another_instance(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    cut, good = cutting(backends, env)
    with meshlib.Client() as client:
        responses = [client.get("http://weather/whoami") for _ in range(4)]
        assert [r.text for r in responses] == [good.name] * 4  # whole bodies, all from good
        assert ["reset"] in [r.extensions["meshlib"].retry_reasons for r in responses]

        def posts() -> None:
            for _ in range(2):  # round robin reaches the cutting instance
                client.post("http://weather/whoami", content=b"once")

        def streams() -> None:
            for _ in range(2):
                with client.stream("GET", "http://weather/whoami") as r:
                    r.read()

        # a POST may have been acted on: it is not replayed, the caller sees the loss
        # (its body is read by httpx after the mesh handed the response over: the httpx
        # error itself)
        with pytest.raises(httpx.RemoteProtocolError):
            posts()
        # a streaming caller has the body as it comes: the loss is the caller's to see
        with pytest.raises(httpx.RemoteProtocolError):
            streams()
    assert cut.stats()["POST"] == 1


def _refusing(count: int) -> tuple[list[socket.socket], list[str]]:
    """Ports bound and never listening: every connection to them is refused."""
    held = [socket.socket() for _ in range(count)]
    for sock in held:
        sock.bind(("127.0.0.1", 0))
    return held, [f"127.0.0.1:{sock.getsockname()[1]}" for sock in held]


def _check_gave_up(error: BaseException, addresses: list[str]) -> None:
    assert isinstance(error, meshlib.RequestFailed)
    assert isinstance(error, httpx.ConnectError)  # still what httpx code catches
    assert error.service == "weather"
    assert error.attempts == len(error.endpoints) == 3  # the first and MESH_RETRIES=2
    assert set(error.endpoints) == set(addresses)
    assert error.reason == "no retries left"
    assert isinstance(error.__cause__, httpx.ConnectError)
    assert not isinstance(error.__cause__, meshlib.MeshError)
    assert str(error).startswith("service 'weather': 3 attempts failed (on ")
    assert str(error).endswith(f"no retries left; the last: ConnectError: {error.__cause__}")
    assert all(address in str(error) for address in addresses)


def test_when_every_attempt_is_refused_the_error_says_what_was_tried(
    env: pytest.MonkeyPatch,
) -> None:
    """A bare ``ConnectError: [Errno 111]`` named neither the service nor what was tried;
    the error is still an ``httpx.ConnectError``, the httpx error its cause."""
    held, addresses = _refusing(2)
    env.setenv("MESH_STATIC_SERVICES", f"weather={','.join(addresses)}")
    try:
        with meshlib.Client() as client, pytest.raises(httpx.ConnectError) as caught:
            client.get("http://weather/whoami")
        _check_gave_up(caught.value, addresses)

        async def call() -> None:
            async with meshlib.AsyncClient() as client:
                await client.get("http://weather/whoami")

        with pytest.raises(httpx.ConnectError) as caught_async:
            asyncio.run(call())
        _check_gave_up(caught_async.value, addresses)
        # it pickles (as its httpx class too), for errors that cross processes
        again = pickle.loads(pickle.dumps(caught.value))
        assert isinstance(again, httpx.ConnectError)
        assert isinstance(again, meshlib.RequestFailed)
        assert (again.endpoints, str(again)) == (caught.value.endpoints, str(caught.value))
    finally:
        for sock in held:
            sock.close()


def test_a_post_that_timed_out_is_not_resent_and_the_error_says_so(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    slow = backends("slow")
    slow.set_mode(delay_ms=2000)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [slow]))
    env.setenv("MESH_TIMEOUT", "200ms")
    with meshlib.Client() as client, pytest.raises(httpx.ReadTimeout) as caught:
        client.post("http://weather/whoami", content=b"once")
    error = caught.value
    assert isinstance(error, meshlib.RequestFailed)
    assert (error.attempts, error.endpoints) == (1, (slow.address,))
    assert error.reason == "not resent: POST is not idempotent"
    assert str(error).startswith(
        f"service 'weather': 1 attempt failed (on {slow.address}); not resent: POST is not "
        "idempotent; the last: ReadTimeout"
    )
    assert slow.stats()["POST"] == 1


async def _async_gets(n: int) -> list[httpx.Response]:
    async with meshlib.AsyncClient() as client:
        return [await client.get("http://weather/whoami") for _ in range(n)]


def test_an_async_get_cut_off_mid_body_is_retried_on_another_instance(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    _, good = cutting(backends, env)
    responses = anyio.run(_async_gets, 4)
    assert [r.text for r in responses] == [good.name] * 4
    assert ["reset"] in [r.extensions["meshlib"].retry_reasons for r in responses]


def test_post_is_retried_after_a_connect_failure_and_sent_exactly_once(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    dead, alive = backends.many(2)
    dead.kill()
    env.setenv("MESH_STATIC_SERVICES", static_env("orders", [dead, alive]))
    env.setenv("MESH_LB", "round_robin")
    with meshlib.Client() as client:
        responses = [client.post("http://orders/echo", json={"n": i}) for i in range(20)]
    assert [r.status_code for r in responses] == [200] * 20
    assert alive.stats()["POST"] == 20
    assert any(r.extensions["meshlib"].retry_reasons == ["connect"] for r in responses)


def test_post_is_not_retried_after_a_503_unless_the_caller_opts_in(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    servers = backends.many(2)
    for server in servers:
        server.set_mode(status=503)
    env.setenv("MESH_STATIC_SERVICES", static_env("orders", servers))
    env.setenv("MESH_RETRIES", "2")
    with meshlib.Client() as client:
        response = client.post("http://orders/echo", content=b"order-1")
        assert response.status_code == 503
        assert sum(s.stats().get("POST", 0) for s in servers) == 1

        opted = client.post(
            "http://orders/echo",
            content=b"order-2",
            extensions={"meshlib": {"retry_non_idempotent": True}},
        )
        assert opted.status_code == 503
        assert opted.extensions["meshlib"].retry_reasons == ["503", "503"]
        assert sum(s.stats().get("POST", 0) for s in servers) == 1 + 3

        keyed = client.post(
            "http://orders/echo", content=b"order-3", headers={"Idempotency-Key": "k-3"}
        )
        assert keyed.status_code == 503
        assert sum(s.stats().get("POST", 0) for s in servers) == 1 + 3 + 3


def test_get_is_retried_after_a_503_on_another_instance(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    bad, good = backends.many(2)
    bad.set_mode(status=503)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [bad, good]))
    env.setenv("MESH_LB", "round_robin")
    with meshlib.Client() as client:
        responses = [client.get("http://weather/whoami") for _ in range(10)]
    assert {r.text for r in responses} == {"b1"}
    assert bad.stats()["GET"] >= 1


def test_streaming_request_body_is_never_resent(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    servers = backends.many(2)
    for server in servers:
        server.set_mode(status=503)
    env.setenv("MESH_STATIC_SERVICES", static_env("uploads", servers))

    def body() -> object:
        yield b"chunk-1"
        yield b"chunk-2"

    with meshlib.Client() as client:
        response = client.put("http://uploads/echo", content=body())  # PUT is idempotent
    assert response.status_code == 503
    assert sum(s.stats().get("PUT", 0) for s in servers) == 1


def test_retry_after_is_honoured(backends: BackendFactory, env: pytest.MonkeyPatch) -> None:
    server = backends("busy")
    server.set_mode(status=503, retry_after=1)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    env.setenv("MESH_RETRIES", "1")
    with meshlib.Client() as client:
        started = time.monotonic()
        response = client.get("http://weather/whoami")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert server.stats()["GET"] == 2
    assert elapsed >= 1.0


def test_retry_after_beyond_the_deadline_returns_the_response_at_once(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    server = backends("busy")
    server.set_mode(status=503, retry_after=30)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    env.setenv("MESH_DEADLINE", "2s")
    with meshlib.Client() as client:
        response = client.get("http://weather/whoami")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "30"
    assert server.stats()["GET"] == 1


def test_a_hanging_instance_times_out_and_the_retry_lands_elsewhere(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    hanging, healthy = backends.many(2)
    hanging.set_mode(hang=True)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [hanging, healthy]))
    env.setenv("MESH_LB", "round_robin")
    env.setenv("MESH_TIMEOUT", "200ms")
    with meshlib.Client() as client:
        responses = [client.get("http://weather/whoami") for _ in range(4)]
    assert {r.text for r in responses} == {"b1"}
    assert any("timeout" in r.extensions["meshlib"].retry_reasons for r in responses)


def test_deadline_exceeded_is_raised_as_an_httpx_timeout(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    server = backends("slow")
    server.set_mode(delay_ms=2000)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    with meshlib.Client() as client:
        started = time.monotonic()
        with pytest.raises(meshlib.DeadlineExceeded, match="'weather': deadline passed") as info:
            client.get("http://weather/whoami", extensions={"meshlib": {"deadline": 0.3}})
        elapsed = time.monotonic() - started
    assert isinstance(info.value, httpx.TimeoutException)
    assert info.value.service == "weather"
    assert elapsed < 1.5


def test_whole_service_down_retries_stay_in_budget_and_the_breaker_fails_fast(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    servers = backends.many(3)
    for server in servers:
        server.set_mode(status=503)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", servers))
    env.setenv("MESH_RETRIES", "3")
    env.setenv("MESH_RETRY_BUDGET", "20%")
    env.setenv("MESH_RETRY_MIN_PER_SECOND", "0")
    env.setenv("MESH_OUTLIER_CONSECUTIVE_ERRORS", "1000")
    env.setenv("MESH_BREAKER_FAILURES", "1000")
    with meshlib.Client() as client:
        statuses = [client.get("http://weather/whoami").status_code for _ in range(100)]
    assert statuses == [503] * 100
    received = sum(s.stats()["GET"] for s in servers)
    assert 100 < received <= 100 + 20  # 3 retries each would be 400

    _runtime_reset()
    for server in servers:
        server.set_mode(status=503)
    env.setenv("MESH_BREAKER_FAILURES", "10")
    env.setenv("MESH_BREAKER_RESET", "30s")
    before = sum(s.stats()["GET"] for s in servers)
    with meshlib.Client() as client:
        outcomes: list[object] = []
        for _ in range(50):
            started = time.monotonic()
            try:
                outcomes.append(client.get("http://weather/whoami").status_code)
            except meshlib.CircuitOpen as exc:
                outcomes.append((exc, time.monotonic() - started))
    opened = [o for o in outcomes if isinstance(o, tuple)]
    assert len(opened) >= 40
    assert all(isinstance(exc, httpx.TransportError) for exc, _ in opened)
    assert "circuit breaker open" in str(opened[0][0])
    assert max(elapsed for _, elapsed in opened) < 0.05  # no attempt, no wait
    assert sum(s.stats()["GET"] for s in servers) - before <= 10 + 5


def test_breaker_half_open_lets_one_probe_through_then_closes(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    server = backends("a")
    server.set_mode(status=503)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    env.setenv("MESH_RETRIES", "0")
    env.setenv("MESH_BREAKER_FAILURES", "3")
    env.setenv("MESH_BREAKER_RESET", "300ms")
    env.setenv("MESH_OUTLIER_CONSECUTIVE_ERRORS", "1000")
    with meshlib.Client() as client:
        for _ in range(3):
            assert client.get("http://weather/whoami").status_code == 503
        with pytest.raises(meshlib.CircuitOpen):
            client.get("http://weather/whoami")
        server.set_mode(status=None)
        received = server.stats()["GET"]
        wait_until(lambda: _breaker_state(client) == "half-open", what="half-open")
        assert client.get("http://weather/whoami").status_code == 200  # the probe
        assert _breaker_state(client) == "closed"
        assert client.get("http://weather/whoami").status_code == 200
    assert server.stats()["GET"] == received + 2


def test_no_endpoints_says_which_service(env: pytest.MonkeyPatch) -> None:
    env.setenv("MESH_STATIC_SERVICES", "weather=127.0.0.1:1")
    with meshlib.Client() as client, pytest.raises(meshlib.NoHealthyEndpoints) as info:
        client.get("http://nothing.service.consul/")
    assert info.value.service == "nothing"
    assert isinstance(info.value, httpx.RequestError)


def test_unknown_request_options_are_refused(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    env.setenv("MESH_STATIC_SERVICES", "weather=127.0.0.1:1")
    with meshlib.Client() as client, pytest.raises(ValueError, match="retry_unsafe"):
        client.get("http://weather/", extensions={"meshlib": {"retry_unsafe": True}})


# ----------------------------------------------------------------------------- httpx features


def test_httpx_features_keep_working(backends: BackendFactory, env: pytest.MonkeyPatch) -> None:
    server = backends("a")
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    seen: list[str] = []
    with meshlib.Client(
        auth=("user", "pass"),
        event_hooks={"request": [lambda r: seen.append(str(r.url))]},
        base_url="http://weather",
    ) as client:
        echoed = client.get("/echo").json()
        assert echoed["headers"]["authorization"].startswith("Basic ")
        assert seen == ["http://weather/echo"]
        with client.stream("GET", "/whoami") as response:
            assert b"".join(response.iter_bytes()) == b"a"
        with pytest.raises(httpx.HTTPStatusError):
            client.get("/status/404").raise_for_status()


def test_a_callers_timeout_caps_each_attempt(
    backends: BackendFactory, env: pytest.MonkeyPatch
) -> None:
    server = backends("slow")
    server.set_mode(delay_ms=1000)
    env.setenv("MESH_STATIC_SERVICES", static_env("weather", [server]))
    env.setenv("MESH_RETRIES", "0")
    with meshlib.Client(timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
        client.get("http://weather/whoami")


def test_client_is_a_real_httpx_client() -> None:
    with meshlib.Client() as client:
        assert isinstance(client, httpx.Client)
        assert isinstance(client._transport, meshlib.MeshTransport)


# ----------------------------------------------------------------------------- helpers


def _runtime_reset() -> None:
    from meshlib._runtime import live_meshes

    for mesh in live_meshes():
        mesh.close()


def _breaker_state(client: meshlib.Client) -> str:
    transport = client._transport
    assert isinstance(transport, meshlib.MeshTransport)
    return transport.mesh.services()["weather"].breaker.state
