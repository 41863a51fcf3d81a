"""The resilience policies on their own: budget, breaker, ejection, backoff, deadlines."""

from __future__ import annotations

import logging
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pybreaker
import pytest

from meshlib._config import ServicePolicy
from meshlib._service import ServiceState
from meshlib.balance import EndpointState
from meshlib.discovery import Endpoint, Snapshot
from meshlib.resilience._breaker import Breaker
from meshlib.resilience._budget import RetryBudget
from meshlib.resilience._deadline import Deadline, parse_deadline_header
from meshlib.resilience._events import EventLog
from meshlib.resilience._outlier import OutlierDetector
from meshlib.resilience._retry import (
    backoff,
    classify_error,
    classify_response,
    parse_retry_after,
)
from served import ServedFactory

# ----------------------------------------------------------------------------- budget


def test_budget_allows_the_ratio_of_recent_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, ttl=10)
    for _ in range(100):
        budget.record_request(now=5.0)
    allowed = sum(budget.try_retry(now=5.0) for _ in range(100))
    assert allowed == 20


def test_budget_floor_lets_a_quiet_service_retry() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=1, ttl=10)
    budget.record_request(now=0.0)
    assert sum(budget.try_retry(now=0.0) for _ in range(50)) == 10  # 1/s over 10 s


def test_budget_deposits_and_withdrawals_expire_after_ttl() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0, ttl=10)
    for _ in range(10):
        budget.record_request(now=0.0)
    assert sum(budget.try_retry(now=0.0) for _ in range(10)) == 5
    assert not budget.try_retry(now=9.0)
    assert not budget.try_retry(now=20.0)  # the requests expired too
    budget.record_request(now=20.0)
    budget.record_request(now=20.0)
    assert budget.try_retry(now=20.0)


def test_budget_is_exact_across_threads() -> None:
    budget = RetryBudget(ratio=0.1, min_per_second=0, ttl=100)
    for _ in range(1000):
        budget.record_request(now=1.0)
    granted: list[bool] = []

    def worker() -> None:
        granted.extend(budget.try_retry(now=1.0) for _ in range(100))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 100


# ----------------------------------------------------------------------------- breaker


def make_breaker(**kwargs: float) -> Breaker:
    settings = {"failures": 3, "reset_timeout": 0.05, "probes": 2, **kwargs}
    return Breaker("weather", **settings)  # type: ignore[arg-type]


def test_breaker_opens_after_consecutive_failures_only() -> None:
    breaker = make_breaker()
    for failure in (True, True, False, True, True):
        assert breaker.allow() is True
        breaker.record(failure)
    assert breaker.state == "closed"
    breaker.record(True)
    assert breaker.state == "open"
    assert breaker.allow() is False


def test_half_open_admits_a_bounded_number_of_concurrent_probes() -> None:
    breaker = make_breaker(probes=2)
    for _ in range(3):
        breaker.record(True)
    time.sleep(0.06)  # the reset timeout (a state machine's clock, not a race)
    verdicts: list[bool | None] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def contend() -> None:
        barrier.wait()
        verdict = breaker.allow()
        with lock:
            verdicts.append(verdict)

    threads = [threading.Thread(target=contend) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert verdicts.count(None) == 2  # two probes
    assert verdicts.count(False) == 14
    breaker.record(False, probe=True)
    assert breaker.state == "closed"
    assert breaker.allow() is True


def test_a_failed_probe_reopens_the_breaker() -> None:
    breaker = make_breaker(probes=1)
    for _ in range(3):
        breaker.record(True)
    time.sleep(0.06)
    assert breaker.state == "half-open"
    assert breaker.allow() is None
    breaker.record(True, probe=True)
    assert breaker.state == "open"
    assert breaker.allow() is False
    assert 0 < breaker.retry_in() <= 0.05


def test_breaker_listeners_see_transitions_and_cannot_break_requests() -> None:
    breaker = make_breaker()
    seen: list[tuple[str, str, str]] = []
    breaker.listeners.append(lambda *args: seen.append(args))
    breaker.listeners.append(lambda *args: 1 / 0)  # type: ignore[func-returns-value]
    for _ in range(3):
        breaker.record(True)
    assert seen == [("weather", "closed", "open")]


def test_every_breaker_transition_is_one_structured_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="meshlib.resilience")
    # a service name of its own: the process's event log is rate-limited per service
    breaker = Breaker("transitions-geo", failures=2, reset_timeout=0.0, probes=1)
    breaker.record(True)
    breaker.record(True)  # closed -> open
    assert breaker.allow() is None  # open -> half-open
    breaker.record(True, probe=True)  # half-open -> open
    assert breaker.allow() is None  # open -> half-open
    breaker.record(False, probe=True)  # half-open -> closed
    events = [r.meshlib_event for r in caplog.records if hasattr(r, "meshlib_event")]
    assert [(e["event"], e["previous"]) for e in events] == [
        ("breaker.open", "closed"),
        ("breaker.half_open", "open"),
        ("breaker.open", "half-open"),
        ("breaker.half_open", "open"),
        ("breaker.closed", "half-open"),
    ]
    assert all(e["service"] == "transitions-geo" for e in events)
    opened = caplog.records[0]
    assert opened.levelno == logging.WARNING
    assert opened.getMessage().startswith(
        "circuit breaker for 'transitions-geo' opened (2 consecutive requests failed)"
    )
    assert "event=breaker.open service=transitions-geo previous=closed" in opened.getMessage()


def test_event_lines_are_rate_limited_per_event_and_service_and_count_what_was_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.events")
    now = [0.0]
    log = EventLog(logging.getLogger("test.events"), burst=3, window=60, clock=lambda: now[0])
    written = [log.emit(logging.WARNING, "breaker.open", "geo", "opened") for _ in range(5)]
    assert written == [True, True, True, False, False]
    assert log.emit(logging.WARNING, "breaker.open", "forecast", "opened")  # its own limit
    now[0] = 61.0
    assert log.emit(logging.WARNING, "breaker.open", "geo", "opened")
    last = caplog.records[-1]
    assert last.meshlib_event["suppressed"] == 2  # type: ignore[attr-defined]
    assert last.getMessage() == "opened (event=breaker.open service=geo suppressed=2)"
    assert len(caplog.records) == 5


def test_breaker_state_can_live_in_pybreaker_storage() -> None:
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    first = Breaker("weather", failures=2, reset_timeout=10, probes=1, storage=storage)
    second = Breaker("weather", failures=2, reset_timeout=10, probes=1, storage=storage)
    first.record(True)
    second.record(True)
    assert first.state == second.state == "open"  # shared state, as with CircuitRedisStorage


# ----------------------------------------------------------------------------- ejection


def states(count: int) -> list[EndpointState]:
    return [EndpointState(Endpoint("127.0.0.1", 8000 + i)) for i in range(count)]


def test_ejection_after_consecutive_errors_for_a_growing_time() -> None:
    detector = OutlierDetector(consecutive_errors=3, ejection_time=10, max_ejection=0.5)
    endpoints = states(4)
    target = endpoints[0]
    assert not detector.failure(target, 0.0, endpoints)
    assert not detector.failure(target, 0.0, endpoints)
    assert detector.failure(target, 0.0, endpoints)
    assert target.ejected_until == 10.0
    for _ in range(3):
        detector.failure(target, 11.0, endpoints)
    assert target.ejected_until == 11.0 + 20.0  # second ejection: twice as long


def test_a_success_resets_the_consecutive_count() -> None:
    detector = OutlierDetector(consecutive_errors=2, ejection_time=10, max_ejection=1.0)
    endpoints = states(2)
    detector.failure(endpoints[0], 0.0, endpoints)
    detector.success(endpoints[0], 0.0)
    assert not detector.failure(endpoints[0], 0.0, endpoints)


def test_never_more_than_the_max_share_is_ejected_but_always_one_may_be() -> None:
    detector = OutlierDetector(consecutive_errors=1, ejection_time=10, max_ejection=0.5)
    endpoints = states(4)
    ejected = [detector.failure(s, 0.0, endpoints) for s in endpoints]
    assert ejected == [True, True, False, False]
    tiny = OutlierDetector(consecutive_errors=1, ejection_time=10, max_ejection=0.1)
    pair = states(2)
    assert [tiny.failure(s, 0.0, pair) for s in pair] == [True, False]


def test_the_ejection_multiplier_decays_with_good_behaviour() -> None:
    detector = OutlierDetector(consecutive_errors=1, ejection_time=10, max_ejection=1.0)
    endpoints = states(2)
    target = endpoints[0]
    detector.failure(target, 0.0, endpoints)
    detector.failure(target, 10.0, endpoints)  # back at 10, fails again: out for 20
    assert target.ejections == 2
    detector.success(target, 40.0)  # good for a period after the ejection ended
    assert target.ejections == 1


# ----------------------------------------------------------------------------- retry


def test_outcomes_are_classified_by_what_the_server_may_have_seen() -> None:
    request = httpx.Request("GET", "http://weather/")
    connect = classify_error(httpx.ConnectError("refused", request=request))
    assert (connect.retryable, connect.sent, connect.failure) == (True, False, True)
    reset = classify_error(httpx.RemoteProtocolError("closed", request=request))
    assert (reset.retryable, reset.sent, reset.reason) == (True, True, "reset")
    timeout = classify_error(httpx.ReadTimeout("slow", request=request))
    assert (timeout.retryable, timeout.sent, timeout.reason) == (True, True, "timeout")
    pool = classify_error(httpx.PoolTimeout("full", request=request))
    assert (pool.retryable, pool.sent, pool.failure) == (True, False, False)
    for status, retryable in ((502, True), (503, True), (504, True), (500, False)):
        outcome = classify_response(httpx.Response(status, request=request))
        assert (outcome.retryable, outcome.failure) == (retryable, True)
    assert not classify_response(httpx.Response(429, request=request)).retryable
    throttled = httpx.Response(429, headers={"retry-after": "1"}, request=request)
    assert classify_response(throttled).retryable
    assert not classify_response(httpx.Response(404, request=request)).failure


def test_backoff_is_full_jitter_capped() -> None:
    rng = random.Random(7)
    delays = [backoff(n, 0.025, 0.25, rng) for n in range(1, 10) for _ in range(50)]
    assert all(0 <= d <= 0.25 for d in delays)
    assert max(backoff(1, 0.025, 0.25, rng) for _ in range(200)) <= 0.025


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    now = time.time()
    when = format_datetime(datetime.fromtimestamp(now, UTC) + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(when, now=now) == pytest.approx(30, abs=1)
    for bad in (None, "", "soon", "-1", "1.5", "Mon, 99 Foo 2026"):
        assert parse_retry_after(bad) is None


# ----------------------------------------------------------------------------- deadline


def test_deadline_header_round_trip() -> None:
    deadline = Deadline.after(1.5, now=100.0)
    value = deadline.header_value(now=100.5)
    assert value == "1000"
    assert parse_deadline_header(value) == 1.0
    assert Deadline.after(1, now=0).header_value(now=5) == "0"


@pytest.mark.parametrize("bad", [None, "", "-5", "1.5", "abc", "99999999999", " 12 x"])
def test_bad_deadline_headers_are_ignored(bad: str | None) -> None:
    assert parse_deadline_header(bad) is None


# ----------------------------------------------------------------------------- panic mode


def service_with(count: int, **policy: float) -> ServiceState:
    state = ServiceState("weather", ServicePolicy(**policy))  # type: ignore[arg-type]
    state.update(Snapshot("weather", tuple(Endpoint("127.0.0.1", 9000 + i) for i in range(count))))
    return state


def test_ejected_endpoints_are_skipped_until_too_few_remain() -> None:
    state = service_with(4, panic_threshold=0.5)
    state.endpoints[0].ejected_until = 100.0
    assert len(state.candidates(now=50.0, tried=())) == 3
    state.endpoints[1].ejected_until = 100.0
    assert len(state.candidates(now=50.0, tried=())) == 2  # exactly at the threshold
    state.endpoints[2].ejected_until = 100.0
    assert len(state.candidates(now=50.0, tried=())) == 4  # panic: all of them
    assert len(state.candidates(now=150.0, tried=())) == 4  # ejections over


def test_panic_threshold_zero_still_uses_all_when_every_endpoint_is_ejected() -> None:
    state = service_with(2, panic_threshold=0.0)
    for endpoint in state.endpoints:
        endpoint.ejected_until = 100.0
    assert len(state.candidates(now=50.0, tried=())) == 2


def with_unhealthy(healthy: int, unhealthy: int, **policy: float) -> ServiceState:
    state = ServiceState("weather", ServicePolicy(**policy))  # type: ignore[arg-type]
    ports = iter(range(9000, 9100))
    state.update(
        Snapshot(
            "weather",
            tuple(Endpoint("127.0.0.1", next(ports)) for _ in range(healthy)),
            unhealthy=tuple(Endpoint("127.0.0.1", next(ports)) for _ in range(unhealthy)),
        )
    )
    return state


def test_instances_failing_their_checks_are_used_only_in_panic_mode() -> None:
    # Envoy's rule, with the unhealthy instances Consul lists: panic when fewer than the
    # threshold of ALL instances are healthy and not ejected
    state = with_unhealthy(2, 2, panic_threshold=0.5)
    assert [s.endpoint.port for s in state.candidates(now=0.0, tried=())] == [9000, 9001]
    state.endpoints[0].ejected_until = 100.0  # 1 of 4 available: panic, all four
    assert [s.endpoint.port for s in state.candidates(now=0.0, tried=())] == [
        9000, 9001, 9002, 9003
    ]  # fmt: skip
    every_check_failing = with_unhealthy(0, 3, panic_threshold=0.5)
    assert every_check_failing.routable()
    assert len(every_check_failing.candidates(now=0.0, tried=())) == 3


def test_panic_threshold_zero_never_sends_to_instances_failing_their_checks() -> None:
    state = with_unhealthy(1, 3, panic_threshold=0.0)
    assert [s.endpoint.port for s in state.candidates(now=0.0, tried=())] == [9000]
    assert not with_unhealthy(0, 3, panic_threshold=0.0).routable()


def test_an_instance_keeps_its_state_when_its_checks_fail_and_pass_again() -> None:
    state = with_unhealthy(2, 0)
    first = state.endpoints[0]
    first.ejections = 3
    endpoints = tuple(s.endpoint for s in state.endpoints)
    state.update(Snapshot("weather", endpoints[1:], unhealthy=endpoints[:1]))
    assert state.unhealthy == (first,)
    state.update(Snapshot("weather", endpoints))
    assert state.endpoints[0] is first
    assert state.unhealthy == ()


def test_a_retry_prefers_endpoints_this_request_has_not_tried() -> None:
    state = service_with(3)
    tried = [state.endpoints[0].endpoint.key, state.endpoints[1].endpoint.key]
    assert [s.endpoint.port for s in state.candidates(now=0.0, tried=tried)] == [9002]
    every = [s.endpoint.key for s in state.endpoints]
    assert len(state.candidates(now=0.0, tried=every)) == 3


# ---- a caller's deadline header cannot hurt the callee's upstreams (real servers)


@pytest.mark.parametrize(
    ("setting", "relayed"),
    [
        (None, True),  # the default: an unidentified caller's deadline is ignored
        ("1s", True),  # honoured, but never below 1 s
        ("honour", False),  # honoured: every call is cut short, and must not count
    ],
)
def test_a_callers_short_deadline_never_ejects_a_healthy_upstream_or_opens_its_breaker(
    serve: ServedFactory, setting: str | None, relayed: bool
) -> None:
    upstream = serve("fastapi_app:app", {"MESH_SERVICE_NAME": "upstream"})
    env = {"MESH_SERVICE_NAME": "gateway", "MESH_STATIC_SERVICES": f"upstream={upstream.address}"}
    if setting is not None:
        env["MESH_UNIDENTIFIED_DEADLINE"] = setting
    gateway = serve("relay_app:app", env)
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        answers = [
            client.get("/relay", params={"ms": 150}, headers={"x-mesh-deadline-ms": "80"})
            for _ in range(20)  # plaintext: an unidentified caller
        ]
        if relayed:
            assert [r.status_code for r in answers] == [200] * 20
        else:
            assert {r.status_code for r in answers} == {502}
            assert {r.json()["error"] for r in answers} == {"DeadlineExceeded"}
            assert all("deadline passed" in r.json()["detail"] for r in answers)
        state = client.get("/upstream-state").json()
        assert state["breaker"] == "closed", state
        [endpoint] = state["endpoints"]
        assert endpoint["ejected_for_s"] == 0, state
        assert endpoint["ejections"] == 0, state
        normal = client.get("/relay", params={"ms": 150})
        assert normal.status_code == 200, normal.text
