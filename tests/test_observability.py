"""Observability end to end: gateway -> forecast -> geo as real ``meshlib serve`` processes,
traced into a real OTLP receiver, scraped by Debian's real Prometheus, shown by
``meshlib top``; the shipped alert rules and dashboard checked by Prometheus' own tools."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from backends import free_port
from meshlib.security import LocalCA
from missing_tools import require_tool
from otlp_receiver import OtlpReceiver, Received
from polling import wait_until
from prometheus_server import Prometheus
from served import Served, ServedFactory

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "meshlib-alerts.yml"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "meshlib-dashboard.json"

#: span kinds in the OTLP protobuf
INTERNAL, SERVER, CLIENT = 1, 2, 3


class Chain:
    def __init__(self, receiver: OtlpReceiver) -> None:
        common = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "MESH_ACCESS_LOG": "json",
            "MESH_RETRY_BACKOFF": "1ms",
            "MESH_RETRY_BACKOFF_MAX": "5ms",
            "MESH_SHUTDOWN_DELAY": "100ms",
        }
        # ports chosen first, so the three start at once (each knows the next hop's port)
        gateway_port, forecast_port, geo_port = free_port(), free_port(), free_port()
        self.geo = Served("chain_app:app", {**common, "MESH_SERVICE_NAME": "geo"}, port=geo_port)
        self.forecast = Served(
            "chain_app:app",
            {
                **common,
                "MESH_SERVICE_NAME": "forecast",
                "MESH_STATIC_SERVICES": f"geo=127.0.0.1:{geo_port}",
            },
            port=forecast_port,
        )
        self.gateway = Served(
            "chain_app:app",
            {
                **common,
                "MESH_SERVICE_NAME": "gateway",
                "MESH_STATIC_SERVICES": f"forecast=127.0.0.1:{forecast_port}",
            },
            port=gateway_port,
        )
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(Served.start, (self.geo, self.forecast, self.gateway)))
        self.all = (self.gateway, self.forecast, self.geo)

    def stop(self) -> None:
        for served in self.all:
            served.stop()


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture(scope="module")
def chain(otlp: OtlpReceiver) -> Iterator[Chain]:
    chain = Chain(otlp)
    yield chain
    chain.stop()


@pytest.fixture(scope="module")
def prometheus(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    server = Prometheus(
        tmp_path_factory.mktemp("prometheus"),
        {
            "gateway": chain.gateway.admin_address,
            "forecast": chain.forecast.admin_address,
            "geo": chain.geo.admin_address,
        },
        "/mesh/metrics",
        # Prometheus scrapes OpenMetrics (its default Accept header) and keeps exemplars
        features=("exemplar-storage",),
    )
    yield server
    server.stop()


def test_one_trace_spans_the_chain_with_correct_parents_and_attempt_spans(
    chain: Chain, otlp: OtlpReceiver
) -> None:
    token = uuid.uuid4().hex
    r = httpx.get(f"{chain.gateway.url}/plan", params={"token": token}, timeout=20)
    assert r.status_code == 200, r.text
    assert r.json()["geo_attempts"] == 2  # geo's first answer was 503: retried
    trace_id = r.json()["trace_id"]
    assert re.fullmatch("[0-9a-f]{32}", trace_id)

    # meshlib's spans -- gateway: inbound, CLIENT(forecast), attempt; forecast: inbound,
    # CLIENT(geo), 2 attempts; geo: 2 inbound
    spans = wait_until(
        lambda: (found := otlp.trace(trace_id)) and len(found) >= 9 and found,
        timeout=20,
        what="nine meshlib spans of the trace",
    )
    assert len(spans) == 9, spans
    everything = {s.span_id: s for s in otlp.trace(trace_id, scope=None)}

    def mesh_parent(span: Received) -> Received | None:
        """The nearest meshlib span above ``span`` (FastAPI's own spans sit between)."""
        parent = everything.get(span.parent_id)
        while parent is not None and parent.scope != "meshlib":
            parent = everything.get(parent.parent_id)
        return parent

    def find(service: str, kinds: tuple[int, ...], **attrs: object) -> list[Received]:
        return [
            s
            for s in spans
            if s.service == service
            and s.kind in kinds
            and all(s.attributes.get(k) == v for k, v in attrs.items())
        ]

    inbound = (SERVER, INTERNAL)  # INTERNAL under FastAPI's own SERVER span
    (gateway_in,) = find("gateway", inbound)
    assert mesh_parent(gateway_in) is None  # the test sent no traceparent
    assert gateway_in.name == "GET /plan"
    roots = [s for s in everything.values() if not s.parent_id]
    assert len(roots) == 1
    assert roots[0].service == "gateway"
    (gateway_call,) = find("gateway", (CLIENT,), **{"service.peer.name": "forecast"})
    assert mesh_parent(gateway_call) is gateway_in
    assert gateway_call.attributes["meshlib.attempts"] == 1
    (gateway_attempt,) = find("gateway", (CLIENT,), **{"meshlib.attempt": 1})
    assert gateway_attempt.parent_id == gateway_call.span_id
    assert gateway_attempt.attributes["server.port"] == chain.forecast.port

    (forecast_in,) = find("forecast", inbound)
    assert mesh_parent(forecast_in) is gateway_attempt  # across the process boundary
    (forecast_call,) = find("forecast", (CLIENT,), **{"service.peer.name": "geo"})
    assert mesh_parent(forecast_call) is forecast_in
    assert forecast_call.attributes["meshlib.attempts"] == 2
    assert forecast_call.attributes["http.response.status_code"] == 200
    (first,) = find("forecast", (CLIENT,), **{"meshlib.attempt": 1})
    (retry,) = find("forecast", (CLIENT,), **{"meshlib.attempt": 2})
    assert first.parent_id == retry.parent_id == forecast_call.span_id
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["meshlib.breaker.state"] == "closed"
    assert retry.attributes["meshlib.retry.reason"] == "503"
    assert retry.attributes["http.request.resend_count"] == 1

    geo_in = find("geo", inbound)
    assert sorted(mesh_parent(s).span_id for s in geo_in) == sorted(  # type: ignore[union-attr]
        [first.span_id, retry.span_id]
    )
    assert sorted(s.attributes["http.response.status_code"] for s in geo_in) == [200, 503]


def test_the_callers_verified_identity_labels_server_metrics_and_spans(
    otlp: OtlpReceiver, serve: ServedFactory, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "ca"
    LocalCA(ca_dir).init("meshlib.test")
    tls = {
        "MESH_TLS": "permissive",  # the test itself calls forecast in plaintext
        "MESH_TLS_CA": "local",
        "MESH_TLS_DIR": str(ca_dir),
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        # idle mTLS keep-alive connections hold uvicorn's shutdown for the drain timeout
        "MESH_SHUTDOWN_DELAY": "100ms",
        "MESH_DRAIN_TIMEOUT": "2s",
    }
    geo = serve("chain_app:app", {**tls, "MESH_SERVICE_NAME": "geo", "MESH_ACCESS_LOG": "json"})
    forecast = serve(
        "chain_app:app",
        {**tls, "MESH_SERVICE_NAME": "forecast", "MESH_STATIC_SERVICES": f"geo={geo.address}"},
    )
    assert httpx.get(f"{forecast.url}/forecast", timeout=20).status_code == 200

    metrics = httpx.get(f"{geo.admin_url}/mesh/metrics").text
    count = "http_server_request_duration_seconds_count"
    assert _counter(metrics, count, service_name="geo", service_peer_name="forecast") == 1
    (span,) = wait_until(
        lambda: [
            s
            for s in otlp.spans
            if s.scope == "meshlib"
            and s.service == "geo"
            and s.kind in (SERVER, INTERNAL)
            and "meshlib.peer.identity" in s.attributes  # the chain's spans have none
        ],
        timeout=20,
        what="geo's inbound span",
    )
    assert span.attributes["service.peer.name"] == "forecast"
    assert span.attributes["meshlib.peer.identity"] == (
        "spiffe://meshlib.test/ns/default/dc/dc1/svc/forecast"
    )
    # the access log names the verified caller, marked verified
    (line,) = wait_until(
        lambda: [
            json.loads(raw)
            for raw in geo.output.decode(errors="replace").splitlines()
            if raw.startswith("{") and '"direction":"inbound"' in raw
        ],
        timeout=20,
        what="geo's inbound access log line",
    )
    assert (line["source"], line["source_verified"], line["peer"]) == (
        "forecast",
        True,
        "spiffe://meshlib.test/ns/default/dc/dc1/svc/forecast",
    )


def test_access_log_has_one_json_line_per_request_with_trace_ids(chain: Chain) -> None:
    token = uuid.uuid4().hex
    r = httpx.get(f"{chain.gateway.url}/plan", params={"token": token}, timeout=20)
    trace_id = r.json()["trace_id"]

    def lines(served: Served) -> list[dict[str, object]]:
        found = []
        for raw in served.output.decode(errors="replace").splitlines():
            if raw.startswith("{") and trace_id in raw:
                found.append(json.loads(raw))
        return found

    forecast = wait_until(lambda: len(lines(chain.forecast)) >= 2 and lines(chain.forecast))
    inbound = [x for x in forecast if x["direction"] == "inbound"]
    outbound = [x for x in forecast if x["direction"] == "outbound"]
    assert len(inbound) == 1
    assert len(outbound) == 1
    assert inbound[0]["path"] == "/forecast"
    assert inbound[0]["status"] == 200
    assert outbound[0]["source"] == "forecast"
    assert outbound[0]["destination"] == "geo"
    assert outbound[0]["attempts"] == 2
    assert outbound[0]["retry_reasons"] == ["503"]
    assert outbound[0]["endpoint"] == chain.geo.address
    assert isinstance(outbound[0]["duration"], float)
    assert token not in json.dumps(forecast)  # no query strings: they may carry secrets


def test_inbound_lines_name_an_unverified_caller_as_it_names_itself(chain: Chain) -> None:
    # no mTLS in this chain: the callers' names come from x-mesh-source, marked unverified
    r = httpx.get(f"{chain.gateway.url}/plan", headers={"x-mesh-source": "mallory"}, timeout=20)
    trace_id = r.json()["trace_id"]

    def inbound(served: Served) -> list[dict[str, object]]:
        return [
            json.loads(raw)
            for raw in served.output.decode(errors="replace").splitlines()
            if raw.startswith("{") and trace_id in raw and '"direction":"inbound"' in raw
        ]

    lines = wait_until(
        lambda: all(inbound(s) for s in chain.all) and [inbound(s) for s in chain.all]
    )
    gateway, forecast, geo = (served[0] for served in lines)
    assert (forecast["source"], forecast["source_verified"], forecast["peer"]) == (
        "gateway",
        False,
        None,
    )
    assert (geo["source"], geo["source_verified"]) == ("forecast", False)
    # anyone can claim a name: it is shown as claimed, and never labels a metric
    assert (gateway["source"], gateway["source_verified"]) == ("mallory", False)
    metrics = httpx.get(f"{chain.gateway.admin_url}/mesh/metrics", timeout=10).text
    assert "mallory" not in metrics


def test_services_push_metrics_over_otlp(chain: Chain, otlp: OtlpReceiver) -> None:
    httpx.get(f"{chain.gateway.url}/plan", timeout=20)
    wait_until(
        lambda: (
            {"http.client.request.duration", "http.server.request.duration"} <= otlp.metric_names
        ),
        timeout=20,
        what="the HTTP duration metrics over OTLP",
    )


def test_a_forked_gunicorn_worker_pushes_its_own_metrics(
    otlp: OtlpReceiver, serve: ServedFactory
) -> None:
    # gunicorn loads the app, and so starts telemetry, before it forks the worker
    served = serve(
        "flask_app:app",
        {
            "MESH_SERVICE_NAME": "flaskweb",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "MESH_SHUTDOWN_DELAY": "100ms",
        },
    )
    assert httpx.get(f"{served.url}/hello", timeout=10).status_code == 200
    wait_until(
        lambda: ("flaskweb", "http.server.request.duration") in otlp.metrics_by_service,
        timeout=20,
        what="the worker's server metrics over OTLP",
    )


def _counter(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_scrapes_the_counts_and_error_rate_the_test_produced(
    chain: Chain, prometheus: Prometheus
) -> None:
    count = "http_server_request_duration_seconds_count"
    before = httpx.get(f"{chain.forecast.admin_url}/mesh/metrics").text
    served_before = _counter(before, count, service_name="forecast")
    errors_before = _counter(
        before, count, service_name="forecast", http_response_status_code="500"
    )
    for fail in (0, 0, 1, 0, 0, 1, 0, 0, 1):
        httpx.get(f"{chain.gateway.url}/plan", params={"fail": fail}, timeout=20)
    total = served_before + 9
    errors = errors_before + 3

    wait_until(
        lambda: prometheus.value(f'sum({count}{{service_name="forecast"}})') == total,
        timeout=30,
        what=f"Prometheus to count {total:g} requests served by forecast",
    )
    assert (
        prometheus.value(
            f'sum({count}{{service_name="forecast",http_response_status_code=~"5.."}})'
        )
        == errors
    )
    rate = prometheus.value(
        f'sum({count}{{service_name="forecast",http_response_status_code=~"5.."}})'
        f' / sum({count}{{service_name="forecast"}})'
    )
    assert rate == pytest.approx(errors / total)
    edge = (
        'sum(http_client_request_duration_seconds_count{service_name="gateway",'
        'service_peer_name="forecast",http_response_status_code="500"})'
    )
    # gateway is scraped separately from forecast: wait for its series too
    wait_until(lambda: prometheus.value(edge) == errors, timeout=30, what="the gateway's edge")
    assert (
        prometheus.value(
            'sum(meshlib_client_breaker_state{service_name="forecast",service_peer_name="geo",'
            'meshlib_breaker_state="closed"})'
        )
        == 1
    )


def test_prometheus_links_latency_buckets_to_the_trace_by_exemplars(
    chain: Chain, prometheus: Prometheus
) -> None:
    start = time.time() - 1
    trace_id = httpx.get(f"{chain.gateway.url}/plan", timeout=20).json()["trace_id"]

    def linked() -> list[str]:
        found = prometheus.exemplars(
            'http_server_request_duration_seconds_bucket{service_name="forecast"}',
            start,
            time.time() + 1,
        )
        return [
            exemplar["labels"]["trace_id"]
            for series in found
            for exemplar in series["exemplars"]
            if exemplar["labels"].get("trace_id") == trace_id
        ]

    wait_until(linked, timeout=30, what=f"an exemplar of trace {trace_id} in Prometheus")
    target = httpx.get(f"{prometheus.url}/api/v1/targets", timeout=5).json()
    for active in target["data"]["activeTargets"]:  # OpenMetrics parsed without error
        assert active["lastError"] == "", active


def test_meshlib_top_once_prints_each_edge(chain: Chain, prometheus: Prometheus) -> None:
    def top() -> str:
        # traffic on every poll: rate() needs the counters to grow after their first scrape
        httpx.get(f"{chain.gateway.url}/plan", timeout=20)
        result = subprocess.run(
            [sys.executable, "-m", "meshlib", "top", "--once", "--prometheus", prometheus.url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        # edges with traffic in the window (the request above, once Prometheus scraped it)
        rows = {
            tuple(line.split()[:2])
            for line in result.stdout.splitlines()[1:]
            if _positive(line.split()[2:3])
        }
        return result.stdout if {("gateway", "forecast"), ("forecast", "geo")} <= rows else ""

    output = wait_until(top, timeout=30, what="both edges with traffic in meshlib top")
    header, *rows = output.splitlines()
    assert header.split() == ["SOURCE", "DESTINATION", "RPS", "SUCCESS", "P99"]
    for row in rows:
        _source, _destination, rps, success, p99 = row.split()
        assert float(rps) > 0
        assert success.endswith("%")
        assert p99.endswith("ms")


def test_meshlib_top_redraws_until_interrupted(chain: Chain, prometheus: Prometheus) -> None:
    top = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshlib",
            "top",
            "--interval",
            "0.2",
            "--prometheus",
            prometheus.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    frames: list[bytes] = []
    buffer = bytearray()

    def read() -> None:
        assert top.stdout is not None
        while chunk := top.stdout.read1(65536):
            buffer.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:

        def redrawn_with_traffic() -> bool:
            httpx.get(f"{chain.gateway.url}/plan", timeout=20)  # a growing counter to show
            last = bytes(buffer).rsplit(b"\x1b[2J", 1)[-1]
            rows = [line.split() for line in last.decode(errors="replace").splitlines()]
            shown = any(r[:2] == ["gateway", "forecast"] and _positive(r[2:3]) for r in rows)
            return bytes(buffer).count(b"\x1b[H\x1b[2J") >= 3 and shown

        wait_until(
            redrawn_with_traffic,
            timeout=30,
            what="three redraws of meshlib top, a later one with gateway -> forecast traffic",
        )
        frames = bytes(buffer).split(b"\x1b[H\x1b[2J")[1:]
        top.send_signal(signal.SIGINT)
        assert top.wait(timeout=10) == 0
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
        reader.join(timeout=10)
        assert top.stdout is not None
        assert top.stderr is not None
        errors = top.stderr.read()
        top.stdout.close()  # closed even when the test failed: no ResourceWarning later
        top.stderr.close()
    assert b"Traceback" not in errors
    for frame in frames[:3]:
        assert frame.startswith(b"meshlib top  " + prometheus.url.encode())
        assert b"SOURCE" in frame


def test_every_dashboard_query_is_valid_promql(prometheus: Prometheus) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        concrete = expr.replace("$__rate_interval", "1m").replace("$service", ".*")
        prometheus.query(concrete)  # asserts Prometheus accepted it


def test_the_node_graph_panel_draws_services_and_their_calls(
    chain: Chain, prometheus: Prometheus
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in dashboard["panels"] if p["type"] == "nodeGraph"]
    queries = {
        t["refId"]: t["expr"].replace("$__rate_interval", "1m").replace("$service", ".*")
        for t in panel["targets"]
    }
    for _ in range(5):
        httpx.get(f"{chain.gateway.url}/plan", timeout=20)

    def ids(ref: str) -> set[str]:
        return {r["metric"].get("id", "") for r in prometheus.query(queries[ref])}

    wait_until(
        lambda: {"gateway->forecast", "forecast->geo"} <= ids("edges"),
        timeout=30,
        what="the calls as edges",
    )
    assert {"gateway", "forecast", "geo"} <= ids("nodes")
    edge = next(
        r for r in prometheus.query(queries["edges"]) if r["metric"]["id"] == "gateway->forecast"
    )
    # the fields the panel's transformations rename to the node graph's source and target
    assert (edge["metric"]["service_name"], edge["metric"]["service_peer_name"]) == (
        "gateway",
        "forecast",
    )


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_alert_rules_fire_on_the_series_they_are_written_for() -> None:
    # error rate, breaker open, certificate expiring, retry budget exhausted; each also
    # checked not to fire early (deploy/prometheus/meshlib-alerts.test.yml)
    result = subprocess.run(
        [require_tool("promtool"), "test", "rules", str(RULES.with_suffix(".test.yml"))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alertmanager_config_passes_amtool() -> None:
    result = subprocess.run(
        [require_tool("amtool"), "check-config", str(ALERTMANAGER)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _positive(field: list[str]) -> bool:
    """A table row's rate is a positive number (a "no traffic yet" line is not a row)."""
    try:
        return bool(field) and float(field[0]) > 0
    except ValueError:
        return False
