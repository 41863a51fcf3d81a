"""The ``Call`` driven directly, without sockets: a retry or breaker rule changed shows here.

The transports (client.py) are loops that ask a ``Call`` for an attempt, do the I/O and
tell it what happened. Here the test is the loop: the "I/O" is an httpx exception or
response made in memory, and each test reads the Call's decisions (the delay, the next
endpoint, the error it raises). The policy comes from ``load_config`` as in production.
"""

from __future__ import annotations

import httpx
import pytest

import meshlib
from meshlib._config import load_config
from meshlib._pipeline import Admission, Call
from meshlib._service import ServiceState
from meshlib.discovery import Endpoint, Snapshot

A, B, C = (Endpoint("10.0.0.1", 8001), Endpoint("10.0.0.2", 8002), Endpoint("10.0.0.3", 8003))


def _service(**env: str) -> ServiceState:
    config = load_config({"MESH_LB": "round_robin", "MESH_RETRY_BACKOFF": "1ms", **env})
    state = ServiceState("weather", config.policy("weather"))
    state.update(Snapshot("weather", (A, B, C)))
    return state


def _request(method: str = "GET", **headers: str) -> httpx.Request:
    return httpx.Request(method, "http://weather/forecast", headers=headers, content=b"{}")


def _refused(request: httpx.Request) -> httpx.ConnectError:
    return httpx.ConnectError("[Errno 111] Connection refused", request=request)


def _until_it_gives_up(call: Call, request: httpx.Request) -> tuple[list[str], Exception]:
    """Refuse every attempt; the endpoints the Call sent to, and the error it raised."""
    tried = []
    while True:
        attempt = call.start_attempt(request)
        tried.append(attempt.state.endpoint.address)
        try:
            delay = call.attempt_failed(attempt, _refused(request))
        except meshlib.RequestFailed as exc:
            return tried, exc
        assert delay is not None


def test_each_retry_goes_to_an_endpoint_not_yet_tried_and_then_the_error_says_so() -> None:
    request = _request()
    call = Call(_service(MESH_RETRIES="2"), request)
    tried, error = _until_it_gives_up(call, request)
    assert sorted(tried) == sorted(e.address for e in (A, B, C))  # three, all different
    assert call.info.retry_reasons == ["connect", "connect"]
    assert isinstance(error, httpx.ConnectError)
    assert isinstance(error, meshlib.RequestFailed)
    assert (error.reason, error.attempts, list(error.endpoints)) == ("no retries left", 3, tried)


def test_a_post_whose_bytes_may_have_been_sent_is_not_resent() -> None:
    request = _request("POST")
    call = Call(_service(), request)
    attempt = call.start_attempt(request)
    sent = httpx.RemoteProtocolError("Server disconnected", request=request)
    with pytest.raises(httpx.RemoteProtocolError) as caught:
        call.attempt_failed(attempt, sent)
    assert isinstance(caught.value, meshlib.RequestFailed)
    assert caught.value.reason == "not resent: POST is not idempotent"
    assert caught.value.__cause__ is sent
    # a refused connection sent nothing: the same POST is retried
    call = Call(_service(), request)
    assert call.attempt_failed(call.start_attempt(request), _refused(request)) is not None


def test_a_post_with_an_idempotency_key_is_resent() -> None:
    request = _request("POST", **{"idempotency-key": "order-17"})
    call = Call(_service(), request)
    attempt = call.start_attempt(request)
    sent = httpx.RemoteProtocolError("Server disconnected", request=request)
    assert call.attempt_failed(attempt, sent) is not None
    assert call.info.retry_reasons == ["reset"]


def test_a_503_is_retried_and_the_last_one_is_the_answer() -> None:
    request = _request()
    call = Call(_service(MESH_RETRIES="1"), request)
    first = call.start_attempt(request)
    assert call.attempt_responded(first, httpx.Response(503, request=request)) is not None
    second = call.start_attempt(request)
    assert second.state.endpoint != first.state.endpoint
    last = httpx.Response(503, request=request)
    assert call.attempt_responded(second, last) is None  # no retry left: hand it over
    call.finish(request, last)
    assert last.extensions["meshlib"].attempts == 2
    assert request.url == httpx.URL("http://weather/forecast")  # put back as it was


def test_the_retry_budget_refuses_a_retry_and_the_error_says_why() -> None:
    request = _request()
    service = _service(MESH_RETRY_BUDGET="0", MESH_RETRY_MIN_PER_SECOND="0")
    call = Call(service, request)
    with pytest.raises(meshlib.RequestFailed) as caught:
        call.attempt_failed(call.start_attempt(request), _refused(request))
    assert caught.value.reason == "the retry budget is spent"


def test_the_breaker_opens_after_failed_requests_and_fails_the_next_fast() -> None:
    service = _service(MESH_BREAKER_FAILURES="3", MESH_RETRIES="0")
    for _ in range(3):
        request = _request()
        call = Call(service, request)
        _until_it_gives_up(call, request)
        call.finish(request, None)
    request = _request()
    with pytest.raises(meshlib.CircuitOpen) as caught:
        Call(service, request).start_attempt(request)
    assert "circuit breaker open after 3 consecutive failed requests" in str(caught.value)


def test_no_attempt_starts_past_the_deadline() -> None:
    request = httpx.Request("GET", "http://weather/", extensions={"meshlib": {"deadline": 0.0}})
    with pytest.raises(meshlib.DeadlineExceeded):
        Call(_service(), request).start_attempt(request)


def test_admission_classifies_routes_and_makes_the_call_without_io() -> None:
    """Stage 1 without sockets: a mesh service gets its Call at once (no wait), a foreign
    host gets none (the transport bypasses the mesh), an unknown ``.service.consul`` name
    is refused while classifying."""
    config = load_config({"MESH_STATIC_SERVICES": "weather=10.0.0.1:8001"})
    with meshlib.Mesh(config) as mesh:
        request = _request()
        admission = Admission(mesh, request)
        assert admission.next() is None
        assert admission.call is not None
        assert admission.call.service.name == "weather"
        foreign = Admission(mesh, httpx.Request("GET", "http://example.org/"))
        assert foreign.next() is None
        assert foreign.call is None
        unknown = Admission(mesh, httpx.Request("GET", "http://nothere.service.consul/"))
        with pytest.raises(meshlib.NoHealthyEndpoints, match="nothere"):
            unknown.next()
