"""Telemetry in one process: the metrics a user scrapes, the access log, failsafe hooks.

Real parts only: real httpx transports (``MockTransport`` is httpx's own) under the real
mesh client, the real Prometheus ``promtool`` to lint the exposition format.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator

import fastapi
import httpx
import pytest

import meshlib
from backends import BackendFactory, free_port
from meshlib._config import load_config
from meshlib.telemetry import prometheus_text, record_certificate_expiry
from meshlib.telemetry._admin import (
    admin_listener,
    is_loopback,
    serve_admin,
    wants_openmetrics,
)
from meshlib.telemetry._export import otlp_metrics
from meshlib.telemetry._inbound import peer_service
from meshlib.telemetry._metrics import REGISTRY, Registry
from missing_tools import require_tool

SERVICES = "weather=127.0.0.1:8001,127.0.0.1:8002"


@pytest.fixture(autouse=True)
def _fresh_metrics() -> Iterator[None]:
    REGISTRY.reset()
    yield
    REGISTRY.reset()


def client(handler: Callable[[httpx.Request], httpx.Response], **env: str) -> meshlib.Client:
    config = load_config(
        {
            "MESH_SERVICE_NAME": "gateway",
            "MESH_STATIC_SERVICES": SERVICES,
            "MESH_RETRY_BACKOFF": "1ms",
            "MESH_RETRY_BACKOFF_MAX": "2ms",
            **env,
        }
    )
    return meshlib.Client(transport=httpx.MockTransport(handler), config=config)


def samples(name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in prometheus_text().splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_logical_requests_are_counted_once_with_source_destination_and_status() -> None:
    with client(lambda r: httpx.Response(200 if r.url.path != "/bad" else 500)) as c:
        for _ in range(3):
            c.get("http://weather/ok")
        c.get("http://weather/bad")
    edge = {"service_name": "gateway", "service_peer_name": "weather"}
    count = "http_client_request_duration_seconds_count"
    assert samples(count, **edge, http_response_status_code="200") == 3
    assert samples(count, **edge, http_response_status_code="500") == 1
    assert samples(count, **edge, http_request_method="GET") == 4
    buckets = samples("http_client_request_duration_seconds_bucket", **edge, le="+Inf")
    assert buckets == 4


def test_no_paths_or_endpoint_addresses_in_labels() -> None:
    with client(lambda r: httpx.Response(200)) as c:
        for i in range(20):
            c.get(f"http://weather/item/{i}")
    text = prometheus_text()
    assert "/item/" not in text
    assert "127.0.0.1:800" not in text
    series = [
        line
        for line in text.splitlines()
        if line.startswith("http_client_request_duration_seconds_count")
    ]
    assert len(series) == 1


@pytest.fixture
def opt_in_labels() -> Iterator[None]:
    """MESH_METRICS_LABELS switches labels on for the process: switch them off after."""
    from meshlib.telemetry._state import STATE

    yield
    STATE.endpoint_label = STATE.path_label = False


@pytest.mark.usefixtures("opt_in_labels")
def test_endpoint_and_path_labels_only_when_asked_for() -> None:
    with client(lambda r: httpx.Response(200 if r.url.host.endswith("1") else 503)) as c:
        c.get("http://weather/item/1")
    assert "meshlib_client_attempt_duration_seconds_count{" not in prometheus_text()
    assert "meshlib_client_path_duration_seconds_count{" not in prometheus_text()

    with client(
        lambda r: httpx.Response(200 if r.url.port == 8001 else 503),
        MESH_METRICS_LABELS="endpoint,path",
        MESH_LB_POLICY="round_robin",
    ) as c:
        for i in range(4):
            c.get(f"http://weather/item/{i % 2}")
    edge = {"service_name": "gateway", "service_peer_name": "weather"}
    attempts = "meshlib_client_attempt_duration_seconds_count"
    good = samples(attempts, **edge, server_address="127.0.0.1", server_port="8001")
    bad = samples(attempts, **edge, server_address="127.0.0.1", server_port="8002")
    assert good == 4  # every logical request ended on the good endpoint
    assert bad >= 1
    assert bad == samples(attempts, **edge, http_response_status_code="503")
    paths = "meshlib_client_path_duration_seconds_count"
    assert samples(paths, **edge, url_path="/item/0", http_response_status_code="200") == 2
    assert samples(paths, **edge, url_path="/item/1") == 2


def test_opt_in_labels_are_capped() -> None:
    from meshlib.telemetry._names import BoundedLabel

    label = BoundedLabel(limit=3)
    assert [label(p) for p in ("/a", "/b", "/a", "/c", "/d", "/b")] == [
        "/a",
        "/b",
        "/a",
        "/c",
        "_OTHER",
        "/b",
    ]


@pytest.mark.usefixtures("opt_in_labels")
def test_server_route_label_is_the_flask_or_fastapi_route_template() -> None:
    import fastapi
    import flask

    flask_app = flask.Flask("routes")
    flask_app.add_url_rule("/forecast/<city>", "f", lambda city: city)
    api = fastapi.FastAPI()

    @api.get("/geo/{city}")
    def geo(city: str) -> str:
        return city

    env = {"MESH_SERVICE_NAME": "forecast", "MESH_METRICS_LABELS": "path"}
    wsgi = meshlib.WSGIMiddleware(flask_app, config=load_config(env))
    with httpx.Client(transport=httpx.WSGITransport(app=wsgi), base_url="http://x") as c:
        for city in ("oslo", "rome", "lima"):
            assert c.get(f"/forecast/{city}").status_code == 200
        assert c.get("/unrouted/x").status_code == 404
    asgi = meshlib.ASGIMiddleware(api, config=load_config(env))
    with httpx.Client(transport=_SyncASGI(asgi), base_url="http://x") as c:
        for city in ("oslo", "rome"):
            assert c.get(f"/geo/{city}").status_code == 200

    routes = "meshlib_server_route_duration_seconds_count"
    assert samples(routes, http_route="/forecast/<city>", http_response_status_code="200") == 3
    assert "/unrouted/x" not in prometheus_text()  # unmatched: never a slot of its own
    assert samples(routes, http_route="/geo/{city}", http_response_status_code="200") == 2
    assert "oslo" not in prometheus_text()


@pytest.mark.usefixtures("opt_in_labels")
def test_unmatched_paths_never_take_a_route_slot() -> None:
    api = fastapi.FastAPI()

    @api.get("/geo/{city}")
    def geo(city: str) -> str:
        return city

    env = {"MESH_SERVICE_NAME": "geo", "MESH_METRICS_LABELS": "path"}
    asgi = meshlib.ASGIMiddleware(api, config=load_config(env))
    with httpx.Client(transport=_SyncASGI(asgi), base_url="http://x") as c:
        for i in range(520):  # more junk than the 500 slots
            assert c.get(f"/wp-admin/{i}.php").status_code == 404
        assert c.get("/geo/oslo").status_code == 200
    routes = "meshlib_server_route_duration_seconds_count"
    assert samples(routes, http_route="/geo/{city}") == 1  # got its slot
    assert samples(routes, http_route="_OTHER") == 0
    assert "wp-admin" not in prometheus_text()


def test_server_duration_has_route_scheme_and_error_type_by_default() -> None:
    api = fastapi.FastAPI()

    @api.get("/geo/{city}")
    def geo(city: str) -> str:
        return city

    asgi = meshlib.ASGIMiddleware(api, config=load_config({"MESH_SERVICE_NAME": "geo"}))
    with httpx.Client(transport=_SyncASGI(asgi), base_url="http://x") as c:
        assert c.get("/geo/oslo").status_code == 200
        assert c.get("/nowhere").status_code == 404
    count = "http_server_request_duration_seconds_count"
    assert samples(count, http_route="/geo/{city}", url_scheme="http") == 1
    (unmatched,) = [
        line for line in prometheus_text().splitlines() if line.startswith(count) and "404" in line
    ]
    assert "http_route" not in unmatched  # no route matched: no route label, not the path
    assert 'url_scheme="http"' in unmatched
    assert "/nowhere" not in prometheus_text()


def test_an_injected_500_carries_error_type_on_the_server_metric() -> None:
    api = fastapi.FastAPI()

    @api.get("/")
    def root() -> str:
        return "ok"

    env = {"MESH_SERVICE_NAME": "geo", "MESH_FAULT_ABORT_STATUS": "500"}
    asgi = meshlib.ASGIMiddleware(api, config=load_config(env))
    with httpx.Client(transport=_SyncASGI(asgi), base_url="http://x") as c:
        assert c.get("/").status_code == 500
    count = "http_server_request_duration_seconds_count"
    assert samples(count, http_response_status_code="500", error_type="500") == 1


def test_client_duration_has_server_address_port_and_error_type_on_failures() -> None:
    with client(lambda r: httpx.Response(200 if r.url.path == "/ok" else 404)) as c:
        c.get("http://weather/ok")
        c.get("http://weather:8080/missing")
    count = "http_client_request_duration_seconds_count"
    ok = samples(count, server_address="weather", server_port="80", http_response_status_code="200")
    assert ok == 1
    assert samples(count, server_address="weather", server_port="8080", error_type="404") == 1
    ok_line = next(
        line
        for line in prometheus_text().splitlines()
        if line.startswith(count) and 'status_code="200"' in line
    )
    assert "error_type" not in ok_line  # success: no error.type


def test_service_name_is_on_the_otlp_resource_only() -> None:
    with client(lambda r: httpx.Response(200)) as c:
        c.get("http://weather/")
    data = otlp_metrics(REGISTRY, load_config({"MESH_SERVICE_NAME": "gateway"}))
    (resource,) = data.resource_metrics
    assert resource.resource.attributes["service.name"] == "gateway"
    for metric in resource.scope_metrics[0].metrics:
        for point in metric.data.data_points:
            assert "service.name" not in point.attributes, metric.name
    metrics = {m.name: m for m in resource.scope_metrics[0].metrics}
    (point,) = metrics["http.client.request.duration"].data.data_points
    assert point.attributes["server.address"] == "weather"
    assert point.attributes["server.port"] == "80"


def test_counters_exist_at_zero_before_their_first_event() -> None:
    with client(lambda r: httpx.Response(200)) as c:
        c.get("http://weather/")
        text = prometheus_text()
    # (the source label is the process's service name: whichever test configured it last)
    for name in (
        "meshlib_client_retry_budget_exhausted_total",
        "meshlib_client_breaker_refused_total",
        "meshlib_client_ejections_total",
    ):
        assert re.search(rf'^{name}{{[^}}]*service_peer_name="weather"}} 0$', text, re.M), name
    for reason in ("connect", "503", "hedge"):
        retries = rf'service_peer_name="weather",meshlib_retry_reason="{reason}"}} 0$'
        assert re.search(rf"^meshlib_client_retries_total{{[^}}]*{retries}", text, re.M)

    api = fastapi.FastAPI()
    meshlib.ASGIMiddleware(api, config=load_config({"MESH_SERVICE_NAME": "geo"}))
    text = prometheus_text()  # a server that has not answered anything yet
    assert 'meshlib_server_load_shed_total{service_name="geo"} 0\n' in text
    assert 'meshlib_server_faults_total{service_name="geo",meshlib_fault_kind="abort"} 0\n' in text
    limited = 'meshlib_server_rate_limited_total{service_name="geo",meshlib_limit_scope="source"} 0'
    assert limited in text


def test_a_build_info_metric_names_meshlib_and_python() -> None:
    import platform

    line = next(
        line for line in prometheus_text().splitlines() if line.startswith("meshlib_build_info{")
    )
    assert f'meshlib_version="{meshlib.__version__}"' in line
    assert f'process_runtime_version="{platform.python_version()}"' in line
    assert line.endswith("} 1")


def test_readiness_and_in_flight_are_labelled_service_name_and_exported_over_otlp() -> None:
    def app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    config = load_config({"MESH_SERVICE_NAME": "forecast"})
    mesh_app = meshlib.WSGIMiddleware(app, config=config)  # type: ignore[arg-type]
    with httpx.Client(transport=httpx.WSGITransport(app=mesh_app), base_url="http://x") as c:
        assert c.get("/").status_code == 200
    text = prometheus_text()
    assert 'meshlib_ready{service_name="forecast"} 1\n' in text
    assert 'meshlib_inbound_requests_in_flight{service_name="forecast"} 0\n' in text
    data = otlp_metrics(REGISTRY, config)
    metrics = {m.name: m for m in data.resource_metrics[0].scope_metrics[0].metrics}
    (ready,) = metrics["meshlib.ready"].data.data_points
    assert ready.value == 1
    assert "meshlib.inbound.requests.in_flight" in metrics
    assert "meshlib.build.info" in metrics


class _SyncASGI(httpx.BaseTransport):
    """httpx's ASGITransport driven from sync code (one event loop per request)."""

    def __init__(self, app: object) -> None:
        self._inner = httpx.ASGITransport(app=app)  # type: ignore[arg-type]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        import asyncio

        async def run() -> httpx.Response:
            response = await self._inner.handle_async_request(request)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        return asyncio.run(run())


def test_retries_by_reason_budget_exhaustion_and_ejections_are_counted() -> None:
    with client(
        lambda r: httpx.Response(503),
        MESH_RETRIES="2",
        MESH_RETRY_BUDGET="0",
        MESH_RETRY_MIN_PER_SECOND="0",
        MESH_OUTLIER_CONSECUTIVE_ERRORS="1",
        MESH_OUTLIER_MAX_EJECTION="100%",
    ) as c:
        assert c.get("http://weather/").status_code == 503
    edge = {"service_name": "gateway", "service_peer_name": "weather"}
    # budget 0 and no floor: the first retry is refused
    assert samples("meshlib_client_retry_budget_exhausted_total", **edge) == 1
    assert samples("meshlib_client_retries_total", **edge) == 0
    assert samples("meshlib_client_ejections_total", **edge) == 1
    assert samples("meshlib_client_endpoints", **edge, meshlib_endpoint_state="ejected") == 1
    assert samples("meshlib_client_endpoints", **edge, meshlib_endpoint_state="healthy") == 1

    REGISTRY.reset()
    with client(lambda r: httpx.Response(503), MESH_RETRIES="2") as c:
        info = c.get("http://weather/").extensions["meshlib"]
    assert info.retry_reasons == ["503", "503"]
    assert samples("meshlib_client_retries_total", **edge, meshlib_retry_reason="503") == 2


def test_an_open_breaker_shows_in_state_and_refusals() -> None:
    with client(lambda r: httpx.Response(503), MESH_RETRIES="0", MESH_BREAKER_FAILURES="2") as c:
        c.get("http://weather/")
        c.get("http://weather/")
        with pytest.raises(meshlib.CircuitOpen):
            c.get("http://weather/")
    edge = {"service_name": "gateway", "service_peer_name": "weather"}
    assert samples("meshlib_client_breaker_state", **edge, meshlib_breaker_state="open") == 1
    assert samples("meshlib_client_breaker_state", **edge, meshlib_breaker_state="closed") == 0
    assert samples("meshlib_client_breaker_refused_total", **edge) == 1
    count = "http_client_request_duration_seconds_count"
    assert samples(count, **edge, error_type="CircuitOpen") == 1


def test_transport_errors_are_labelled_by_error_type() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with client(refuse, MESH_RETRIES="1") as c, pytest.raises(httpx.ConnectError):
        c.get("http://weather/")
    assert (
        samples(
            "http_client_request_duration_seconds_count",
            service_peer_name="weather",
            error_type="ConnectError",
        )
        == 1
    )
    assert samples("meshlib_client_retries_total", meshlib_retry_reason="connect") == 1


def test_exposition_passes_promtool_check_metrics() -> None:
    promtool = require_tool("promtool")
    with client(lambda r: httpx.Response(200)) as c:
        c.get("http://weather/")
    record_certificate_expiry(2_000_000_000.0, "gateway")
    text = prometheus_text()
    assert "meshlib_certificate_expiry_seconds" in text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_access_log_line_is_json_without_query_strings(caplog: pytest.LogCaptureFixture) -> None:
    with client(lambda r: httpx.Response(201), MESH_ACCESS_LOG="json") as c:
        caplog.set_level(logging.INFO, logger="meshlib.access")
        logging.getLogger("meshlib.access").addHandler(caplog.handler)
        try:
            c.get("http://weather/v1/forecast?token=s3cret&city=Oslo")
        finally:
            logging.getLogger("meshlib.access").removeHandler(caplog.handler)
    records = [r for r in caplog.records if r.name == "meshlib.access.outbound"]
    assert len(records) == 1
    line = json.loads(records[0].getMessage())
    assert line["direction"] == "outbound"
    assert line["source"] == "gateway"
    assert line["destination"] == "weather"
    assert line["status"] == 201
    assert line["attempts"] == 1
    assert line["path"] == "/v1/forecast"  # the path, never the query string
    assert re.fullmatch(r"127\.0\.0\.1:800[12]", line["endpoint"])
    assert "s3cret" not in records[0].getMessage()
    assert records[0].access == line  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_inbound_access_log_lines_mark_injected_faults(
    caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    env = {
        "MESH_SERVICE_NAME": "geo",
        "MESH_ACCESS_LOG": "json",
        "MESH_FAULT_ABORT_STATUS": "500",
        "MESH_FAULT_HEADER": "x-chaos=on",
    }
    transport: httpx.BaseTransport
    if kind == "asgi":
        api = fastapi.FastAPI()
        api.get("/")(lambda: "ok")
        transport = _SyncASGI(meshlib.ASGIMiddleware(api, config=load_config(env)))
    else:

        def app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
            start_response("200 OK", [])
            return [b"ok"]

        wsgi = meshlib.WSGIMiddleware(app, config=load_config(env))  # type: ignore[arg-type]
        transport = httpx.WSGITransport(app=wsgi)
    caplog.set_level(logging.INFO, logger="meshlib.access")
    logging.getLogger("meshlib.access").addHandler(caplog.handler)
    try:
        with httpx.Client(transport=transport, base_url="http://x") as c:
            assert c.get("/").status_code == 200
            assert c.get("/", headers={"x-chaos": "on"}).status_code == 500
    finally:
        logging.getLogger("meshlib.access").removeHandler(caplog.handler)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("inbound")]
    assert [(line["status"], bool(line["fault"])) for line in lines] == [(200, False), (500, True)]


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_inbound_lines_mark_a_claimed_caller_unverified(
    caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    env = {"MESH_SERVICE_NAME": "geo", "MESH_ACCESS_LOG": "json"}
    transport: httpx.BaseTransport
    if kind == "asgi":
        api = fastapi.FastAPI()
        api.get("/")(lambda: "ok")
        transport = _SyncASGI(meshlib.ASGIMiddleware(api, config=load_config(env)))
    else:

        def app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
            start_response("200 OK", [])
            return [b"ok"]

        wsgi = meshlib.WSGIMiddleware(app, config=load_config(env))  # type: ignore[arg-type]
        transport = httpx.WSGITransport(app=wsgi)
    caplog.set_level(logging.INFO, logger="meshlib.access")
    logging.getLogger("meshlib.access").addHandler(caplog.handler)
    try:
        with httpx.Client(transport=transport, base_url="http://x") as c:
            c.get("/", headers={"x-mesh-source": "forecast"})
            c.get("/", headers={"x-mesh-source": 'a "name" with spaces'})
            c.get("/")
    finally:
        logging.getLogger("meshlib.access").removeHandler(caplog.handler)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("inbound")]
    assert [(line["source"], line["source_verified"], line["peer"]) for line in lines] == [
        ("forecast", False, None),
        (None, False, None),  # not a service name: not shown at all
        (None, False, None),
    ]
    assert "forecast" not in prometheus_text()  # never a label


def test_access_log_lines_can_go_to_a_file_of_their_own(tmp_path: pathlib.Path) -> None:
    parent = logging.getLogger("meshlib.access")
    kept = list(parent.handlers)  # an earlier test's handler: this one installs its own
    for handler in kept:
        parent.removeHandler(handler)
    path = tmp_path / "access.jsonl"
    try:
        with client(
            lambda r: httpx.Response(200), MESH_ACCESS_LOG="json", MESH_ACCESS_LOG_FILE=str(path)
        ) as c:
            c.get("http://weather/to-the-file")
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(line["direction"], line["path"]) for line in lines] == [
            ("outbound", "/to-the-file")
        ]
    finally:
        for handler in list(parent.handlers):
            parent.removeHandler(handler)
            handler.close()
        for handler in kept:
            parent.addHandler(handler)


def test_a_failing_telemetry_hook_never_fails_the_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Explode(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise RuntimeError("telemetry sink broke")

    access = logging.getLogger("meshlib.access.outbound")
    explode = Explode()
    access.addFilter(explode)
    try:
        with client(lambda r: httpx.Response(200), MESH_ACCESS_LOG="json") as c:
            assert c.get("http://weather/").status_code == 200
    finally:
        access.removeFilter(explode)
    assert any(
        r.name == "meshlib.telemetry" and "outbound telemetry failed" in r.getMessage()
        for r in caplog.records
    )
    assert samples("http_client_request_duration_seconds_count") == 1  # recorded first


def test_the_admin_listener_serves_metrics_status_and_health_for_pure_clients() -> None:
    listener = serve_admin("127.0.0.1", 0)
    with client(lambda r: httpx.Response(200)) as c:
        c.get("http://weather/")
        for path in ("/metrics", "/mesh/metrics"):
            r = httpx.get(f"{listener.url}{path}")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert "http_client_request_duration_seconds_count" in r.text
        assert httpx.get(f"{listener.url}/other").status_code == 404
        assert httpx.get(f"{listener.url}/mesh/health").status_code == 200
        # a forwarded header never makes a peer loopback, nor a loopback peer foreign
        status = httpx.get(
            f"{listener.url}/mesh/status", headers={"x-forwarded-for": "192.0.2.7"}
        ).json()
    endpoints = status["services"]["weather"]["endpoints"]
    assert sorted(e["address"] for e in endpoints) == ["127.0.0.1:8001", "127.0.0.1:8002"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("fe80::1%lo", False),
        ("::1:5ee:bad:c0de", False),
        ("127.example.com", False),
        ("::ffff:192.0.2.1", False),
        ("10.0.0.1", False),
        ("", False),
        (None, False),
    ],
)
def test_loopback_is_decided_by_address_never_by_text(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_otlp_data_carries_the_same_numbers_with_semconv_names() -> None:
    with client(lambda r: httpx.Response(200)) as c:
        c.get("http://weather/")
        c.get("http://weather/")
    data = otlp_metrics(REGISTRY, load_config({"MESH_SERVICE_NAME": "gateway"}))
    (resource,) = data.resource_metrics
    assert resource.resource.attributes["service.name"] == "gateway"
    metrics = {m.name: m for m in resource.scope_metrics[0].metrics}
    (point,) = metrics["http.client.request.duration"].data.data_points
    assert point.count == 2
    assert point.attributes["service.peer.name"] == "weather"
    assert point.attributes["http.response.status_code"] == "200"
    assert len(point.bucket_counts) == len(point.explicit_bounds) + 1


@pytest.mark.parametrize(
    ("peer", "service"),
    [
        ("spiffe://abc.consul/ns/default/dc/dc1/svc/web", "web"),
        ("spiffe://meshlib.local/ns/default/dc/eu-1/svc/forecast-v2", "forecast-v2"),
        ("https://evil/svc/web", ""),
        ("spiffe://td/ns/default/dc/dc1/svc/" + "x" * 80, ""),
        (None, ""),
    ],
)
def test_the_caller_label_comes_only_from_a_verified_spiffe_id(peer: object, service: str) -> None:
    assert peer_service(peer) == service


def test_server_metrics_of_a_wsgi_app_and_no_metrics_for_mesh_routes() -> None:
    def app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
        start_response("404 Not Found" if environ["PATH_INFO"] == "/nope" else "200 OK", [])
        return [b"ok"]

    config = load_config({"MESH_SERVICE_NAME": "forecast", "MESH_SERVICE_VERSION": "v2"})
    mesh_app = meshlib.WSGIMiddleware(app, config=config)  # type: ignore[arg-type]
    with httpx.Client(transport=httpx.WSGITransport(app=mesh_app), base_url="http://x") as c:
        c.get("/hello")
        c.get("/nope")
        assert c.get("/mesh/health").status_code == 404  # admin routes: not on the app port
        assert c.get("/mesh/metrics").status_code == 404
    listener = admin_listener()
    assert listener is not None  # the middleware opened it when it started
    text = httpx.get(f"{listener.url}/mesh/metrics").text
    count = "http_server_request_duration_seconds_count"
    assert 'service_name="forecast"' in text
    assert 'service_version="v2"' in text
    assert samples(count, service_name="forecast") == 2  # /mesh/* not measured
    assert samples(count, service_name="forecast", http_response_status_code="404") == 1


def test_the_current_mesh_certificate_expiry_is_published(
    tmp_path: pathlib.Path,
) -> None:
    from meshlib.security import LocalCA

    LocalCA(tmp_path).init("meshlib.local")
    config = load_config(
        {
            "MESH_SERVICE_NAME": "gateway",
            "MESH_TLS": "strict",
            "MESH_TLS_CA": "local",
            "MESH_TLS_DIR": str(tmp_path),
            "MESH_TLS_LEAF_TTL": "1h",
        }
    )
    with meshlib.Mesh(config):
        expiry = samples("meshlib_certificate_expiry_seconds", service_name="gateway")
        assert time.time() + 50 * 60 < expiry <= time.time() + 61 * 60
    # a closed mesh's certificate is no longer in use: not published
    assert not samples("meshlib_certificate_expiry_seconds", service_name="gateway")


def test_a_failing_gauge_callback_does_not_hide_the_other_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = Registry()

    def broken() -> list[tuple[tuple[str, ...], float]]:
        raise RuntimeError("gauge source gone")

    registry.gauge("x.broken", "1", "Broken.", (), broken)
    registry.counter("x.requests", "1", "Requests.", ("service.name",)).add(("a",), 2)
    text = registry.prometheus_text()
    assert 'x_requests_total{service_name="a"} 2' in text
    assert "x_broken" not in text
    assert "collecting x.broken failed" in caplog.text


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a process has one global tracer provider)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MESH_"))}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


_CALL = """
import httpx, meshlib
client = meshlib.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200)))
client.get("http://weather/x")
"""


def test_otel_traces_exporter_console_prints_the_client_and_attempt_spans() -> None:
    result = _python(
        _CALL, OTEL_TRACES_EXPORTER="console", MESH_STATIC_SERVICES="weather=127.0.0.1:1"
    )
    assert result.returncode == 0, result.stderr
    assert '"name": "GET weather"' in result.stdout
    assert '"name": "GET weather attempt"' in result.stdout
    assert '"kind": "SpanKind.CLIENT"' in result.stdout


def test_no_exporter_asked_for_means_no_tracer_provider_is_installed() -> None:
    code = _CALL + (
        "from opentelemetry import trace\nprint(type(trace.get_tracer_provider()).__name__)\n"
    )
    for env in (
        {},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"},
    ):
        result = _python(code, MESH_STATIC_SERVICES="weather=127.0.0.1:1", **env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "ProxyTracerProvider", env


def test_an_applications_own_tracer_provider_is_left_alone_and_used() -> None:
    code = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import"
        " InMemorySpanExporter\n"
        "memory = InMemorySpanExporter()\n"
        "provider = TracerProvider()\n"
        "provider.add_span_processor(SimpleSpanProcessor(memory))\n"
        "trace.set_tracer_provider(provider)\n"
        + _CALL
        + "assert trace.get_tracer_provider() is provider\n"
        "print(sorted(s.name for s in memory.get_finished_spans()))\n"
    )
    result = _python(
        code, OTEL_TRACES_EXPORTER="console", MESH_STATIC_SERVICES="weather=127.0.0.1:1"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['GET weather', 'GET weather attempt']"


_BYPASS = """
import asyncio, json, sys, httpx, meshlib
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from meshlib.telemetry import prometheus_text
memory = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(memory))
trace.set_tracer_provider(provider)
url = sys.argv[1]
with meshlib.Client() as client:
    echoed = client.get(url + "/echo").json()["headers"]
    assert client.get(url + "/status/503").status_code == 503
    try:
        client.get("http://127.0.0.1:" + sys.argv[2] + "/")
    except httpx.ConnectError:
        pass
    else:
        raise AssertionError("nothing listens there")
async def main():
    async with meshlib.AsyncClient() as client:
        assert (await client.get(url + "/whoami")).status_code == 200
asyncio.run(main())
spans = [
    {
        "name": s.name,
        "kind": s.kind.name,
        "trace_id": trace.format_trace_id(s.context.trace_id),
        **dict(s.attributes or {}),
    }
    for s in memory.get_finished_spans()
]
print(json.dumps({"spans": spans, "echoed": echoed, "metrics": prometheus_text()}))
"""


def test_calls_that_bypass_the_mesh_leave_a_span_a_metric_and_an_access_log_line(
    backends: BackendFactory, tmp_path: pathlib.Path
) -> None:
    backend = backends("plain")
    log = tmp_path / "access.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", _BYPASS, backend.url, str(free_port())],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MESH_"))},
            "MESH_SERVICE_NAME": "gateway",
            "MESH_STATIC_SERVICES": "weather=127.0.0.1:1",
            "MESH_ACCESS_LOG": "json",
            "MESH_ACCESS_LOG_FILE": str(log),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    port = backend.port
    # one CLIENT span per request, named after the method, with the conventions' attributes
    spans = sorted(out["spans"], key=lambda s: (s.get("server.port") != port, s["name"]))
    assert [s["kind"] for s in spans] == ["CLIENT"] * 4
    assert {s["name"] for s in spans} == {"GET"}
    assert not [s for s in spans if "service.peer.name" in s]
    ours = [s for s in spans if s["server.port"] == port]
    assert sorted(s.get("http.response.status_code") for s in ours) == [200, 200, 503]
    assert {s["server.address"] for s in spans} == {"127.0.0.1"}
    (refused,) = (s for s in spans if s["server.port"] != port)
    assert refused["error.type"] == "ConnectError"
    # the trace goes on to the server, as with OpenTelemetry's own httpx instrumentation
    traced = out["echoed"]["traceparent"].split("-")[1]
    assert traced in {s["trace_id"] for s in ours}
    assert "x-mesh-deadline-ms" not in out["echoed"]
    assert "x-mesh-source" not in out["echoed"]  # the mesh's own headers stay in the mesh
    # the duration metric: server.address and server.port, no service.peer.name
    counts = [
        line
        for line in out["metrics"].splitlines()
        if line.startswith("http_client_request_duration_seconds_count{")
    ]
    assert counts, out["metrics"]
    assert not [line for line in counts if "service_peer_name" in line]
    ok = f'http_response_status_code="200",server_address="127.0.0.1",server_port="{port}"'
    assert [line.rsplit(" ", 1)[1] for line in counts if ok in line] == ["2"], counts
    assert [line for line in counts if 'error_type="503"' in line], counts
    assert [line for line in counts if 'error_type="ConnectError"' in line], counts
    # and an access log line each, whose destination is no mesh service
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 4
    assert {line["direction"] for line in lines} == {"outbound"}
    assert {line["destination"] for line in lines} == {None}
    assert {line["source"] for line in lines} == {"gateway"}
    mine = [line for line in lines if line["endpoint"] == backend.address]
    assert sorted((line["path"], line["status"]) for line in mine) == [
        ("/echo", 200),
        ("/status/503", 503),
        ("/whoami", 200),
    ]
    assert [line["error"] for line in lines if line not in mine] == ["ConnectError"]


_EARLY = """
import asyncio, json, socket, sys, httpx, meshlib
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from meshlib.telemetry import prometheus_text
memory = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(memory))
trace.set_tracer_provider(provider)
errors = []
urls = ["http://nothere.service.consul/x", "http://api.example.com/x", "http://weather/x"]
with meshlib.Client() as client:
    for url in urls:
        try:
            client.get(url)
        except meshlib.MeshRequestError as exc:
            errors.append(type(exc).__qualname__)
async def main():
    async with meshlib.AsyncClient() as client:
        try:
            await client.get(urls[0])
        except meshlib.NoHealthyEndpoints as exc:
            errors.append("async " + type(exc).__qualname__)
asyncio.run(main())
spans = [
    {"name": s.name, "kind": s.kind.name, "status": s.status.status_code.name,
     **dict(s.attributes or {})}
    for s in memory.get_finished_spans() if s.kind.name == "CLIENT" and "attempt" not in s.name
]
print(json.dumps({"errors": errors, "spans": spans, "metrics": prometheus_text()}))
"""


def test_every_failure_before_an_attempt_ends_in_one_span_and_one_duration() -> None:
    """An unknown ``.service.consul`` name (refused while classifying, before any Call) and
    an egress refusal get one CLIENT span with ``error.type`` and one duration each, as an
    attempt's failure does (the refused connection, for comparison)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        result = _python(
            _EARLY,
            MESH_STATIC_SERVICES=f"weather=127.0.0.1:{closed.getsockname()[1]}",
            MESH_EGRESS="deny",
            MESH_RETRIES="0",
        )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["errors"] == [
        "NoHealthyEndpoints",
        "EgressDenied",
        "RequestFailed[ConnectError]",
        "async NoHealthyEndpoints",
    ]
    spans = out["spans"]
    assert [(s["name"], s.get("error.type"), s["status"]) for s in spans] == [
        ("GET nothere", "NoHealthyEndpoints", "ERROR"),
        ("GET", "EgressDenied", "ERROR"),
        ("GET weather", "ConnectError", "ERROR"),
        ("GET nothere", "NoHealthyEndpoints", "ERROR"),
    ]
    counts = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in out["metrics"].splitlines()
        if line.startswith("http_client_request_duration_seconds_count{")
    }
    by_error = Counter()
    for labels, count in counts.items():
        error = labels.split('error_type="', 1)[1].split('"', 1)[0]
        by_error[error] += count
    assert by_error == {"NoHealthyEndpoints": 2, "EgressDenied": 1, "ConnectError": 1}, counts


_EXEMPLARS = """
import json, httpx, meshlib
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from meshlib.telemetry._admin import serve_admin
from meshlib.telemetry._export import otlp_metrics
from meshlib.telemetry._metrics import REGISTRY
from meshlib._config import load_config
memory = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(memory))
trace.set_tracer_provider(provider)
client = meshlib.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200)))
client.get("http://weather/x")
(span,) = (s for s in memory.get_finished_spans() if s.name == "GET weather")
admin = serve_admin("127.0.0.1", 0).url + "/mesh/metrics"
prometheus = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
answers = {
    name: httpx.get(admin, headers={"accept": accept} if accept else {})
    for name, accept in (("prometheus", prometheus), ("plain", ""), ("text", "text/plain"))
}
(pushed,) = (
    m for m in otlp_metrics(REGISTRY, load_config()).resource_metrics[0].scope_metrics[0].metrics
    if m.name == "http.client.request.duration"
)
print(json.dumps({
    "otlp": [
        [trace.format_trace_id(e.trace_id), trace.format_span_id(e.span_id), e.value]
        for point in pushed.data.data_points for e in point.exemplars
    ],
    "trace_id": trace.format_trace_id(span.context.trace_id),
    "span_id": trace.format_span_id(span.context.span_id),
    **{k: [r.headers["content-type"], r.text] for k, r in answers.items()},
}))
"""


def test_a_traced_request_leaves_an_exemplar_in_openmetrics_and_otlp_only() -> None:
    result = _python(
        _EXEMPLARS, MESH_SERVICE_NAME="gateway", MESH_STATIC_SERVICES="weather=127.0.0.1:1"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    kind, text = out["prometheus"]
    assert kind.startswith("application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    traced = [
        line
        for line in text.splitlines()
        if line.startswith("http_client_request_duration_seconds_bucket{") and " # {" in line
    ]
    assert len(traced) == 1, text
    sample, exemplar = traced[0].split(" # ")
    assert 'service_peer_name="weather"' in sample
    assert exemplar.startswith(f'{{trace_id="{out["trace_id"]}",span_id="{out["span_id"]}"}} ')
    # the exemplar's value lies in its bucket
    bound = re.search(r'le="([^"]+)"', sample)
    assert bound is not None
    assert float(exemplar.split(" ")[1]) <= float(bound.group(1))
    # counters are named by family in OpenMetrics; their samples keep _total
    assert "# TYPE meshlib_client_retries counter" in text
    assert "meshlib_client_retries_total{" in text
    # old scrapers get the classic text, unchanged: no exemplars, no EOF marker
    for name in ("plain", "text"):
        kind, classic = out[name]
        assert kind == "text/plain; version=0.0.4; charset=utf-8"
        assert " # {" not in classic
        assert "# EOF" not in classic
        assert "# TYPE meshlib_client_retries_total counter" in classic

    # the same samples either way
    def samples(exposition: str) -> set[str]:
        return {
            line.split(" # ")[0]
            for line in exposition.splitlines()
            if line.startswith("http_client_request_duration_seconds")
        }

    assert samples(text) == samples(out["plain"][1])
    # the OTLP push carries the same exemplar
    ((trace_id, span_id, value),) = out["otlp"]
    assert (trace_id, span_id) == (out["trace_id"], out["span_id"])
    assert float(exemplar.split(" ")[1]) == pytest.approx(value)


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        (None, False),
        ("*/*", False),
        ("text/plain", False),
        ("application/openmetrics-text", True),
        ("text/plain;version=0.0.4;q=0.5,application/openmetrics-text;version=1.0.0", True),
        ("application/openmetrics-text;q=0.3,text/plain", False),
        ("application/openmetrics-text;q=0", False),
    ],
)
def test_openmetrics_only_when_the_scraper_prefers_it(
    accept: str | None, openmetrics: bool
) -> None:
    assert wants_openmetrics(accept) is openmetrics
