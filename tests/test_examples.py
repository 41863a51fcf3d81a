"""The weather examples end to end, in both frameworks, and ``meshlib demo``.

Every service is a real ``meshlib serve`` process run from examples/<framework>_weather:
geo, forecast v1 twice, forecast v2 once, and the gateway, which calls geo and then forecast
through the mesh. Requests go through the gateway as a user's would.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import otlp_receiver
from consul_agent import ConsulFactory
from meshlib._demo._processes import ServiceProcess, stop_all
from otlp_receiver import OtlpReceiver, Received
from polling import wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: the module-scoped OTLP receiver fixture of tests/otlp_receiver.py, for this module
otlp = otlp_receiver.otlp_receiver


class Weather:
    """One example's services, started from its directory."""

    def __init__(self, framework: str, otlp: OtlpReceiver, logs: Path) -> None:
        self.directory = EXAMPLES / f"{framework}_weather"
        self.common = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "MESH_RETRY_BACKOFF": "1ms",
            "MESH_RETRY_BACKOFF_MAX": "5ms",
        }
        self.logs = logs
        self.geo = self._process("geo", {"MESH_SERVICE_NAME": "geo"})
        forecast = {"MESH_SERVICE_NAME": "forecast"}
        self.forecasts = [
            self._process("forecast", {**forecast, "MESH_SERVICE_VERSION": version}, label)
            for label, version in (("v1-a", "v1"), ("v1-b", "v1"), ("v2", "v2"))
        ]
        self.started = [self.geo, *self.forecasts]
        for process in self.started:
            process.spawn()
        for process in self.started:
            process.wait_ready()
        static = f"geo={self.geo.address};forecast=" + ",".join(f.address for f in self.forecasts)
        gateway = {
            "MESH_SERVICE_NAME": "gateway",
            "MESH_STATIC_SERVICES": static,
            # Round robin gives each instance its share, so the spread can be asserted; the
            # default (p2c_ewma) may starve the slowest of three over a short sequential run.
            "MESH_LB": "round_robin",
        }
        self.gateway = self._process("gateway", gateway)
        self.started.append(self.gateway)
        self.gateway.start()
        self.url = f"http://{self.gateway.address}/forecast"

    def _process(self, module: str, env: dict[str, str], label: str = "") -> ServiceProcess:
        name = f"{module}-{label}" if label else module
        log = self.logs / f"{name}.log"
        return ServiceProcess(name, f"{module}:app", self.directory, {**self.common, **env}, log)


@pytest.fixture(scope="module", params=["fastapi", "flask"])
def weather(
    request: pytest.FixtureRequest, otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Weather]:
    system = Weather(request.param, otlp, tmp_path_factory.mktemp(request.param))
    try:
        yield system
    finally:
        stop_all(system.started)


def test_the_gateway_answers_a_forecast_for_a_city(weather: Weather) -> None:
    r = httpx.get(weather.url, params={"city": "Oslo"}, timeout=20)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["city"], body["lat"], body["lon"]) == ("Oslo", 59.91, 10.75)
    assert isinstance(body["temperature_c"], float)
    assert body["version"] in ("v1", "v2")

    assert httpx.get(weather.url, params={"city": "Atlantis"}, timeout=20).status_code == 404


def test_requests_spread_over_every_forecast_instance(weather: Weather) -> None:
    by_instance: Counter[str] = Counter()
    with httpx.Client(timeout=20) as client:
        for _ in range(90):
            r = client.get(weather.url, params={"city": "Lima"})
            assert r.status_code == 200, r.text
            body = r.json()
            by_instance[body["instance"]] += 1
            # v2 is the newer model: it adds the wind, v1 does not
            assert ("wind_kph" in body) == (body["version"] == "v2"), body
    assert set(by_instance) == {f.address for f in weather.forecasts}, by_instance
    assert min(by_instance.values()) >= 20, by_instance


def test_one_trace_id_spans_gateway_geo_and_forecast(weather: Weather, otlp: OtlpReceiver) -> None:
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    r = httpx.get(
        weather.url, params={"city": "Tokyo"}, headers={"traceparent": traceparent}, timeout=20
    )
    assert r.status_code == 200, r.text

    def caller_of(callee: str) -> Received | None:
        """The nearest span of another service above ``callee``'s inbound span."""
        spans = {s.span_id: s for s in otlp.trace(trace_id, scope=None)}
        inbound = [s for s in spans.values() if s.service == callee and s.scope == "meshlib"]
        parent = spans.get(inbound[0].parent_id) if inbound else None
        while parent is not None and parent.service == callee:
            parent = spans.get(parent.parent_id)
        return parent

    # Each callee's inbound span descends from the gateway's attempt span that reached it
    # (spans arrive in batches from three processes: wait for the links to be complete).
    for callee in ("geo", "forecast"):
        parent = wait_until(
            lambda callee=callee: caller_of(callee),
            timeout=20,
            what=f"{callee}'s inbound span and the gateway span above it",
        )
        assert parent.service == "gateway"
        assert parent.attributes.get("meshlib.attempt") == 1
    assert {s.service for s in otlp.trace(trace_id)} == {"gateway", "geo", "forecast"}


def test_no_request_fails_while_a_forecast_instance_is_killed(weather: Weather) -> None:
    """Runs last for each framework: the killed instance stays down."""
    failures: list[str] = []
    answered: Counter[str] = Counter()
    killed = threading.Event()
    after_kill: Counter[str] = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=20) as client:
            for _ in range(2000):  # bounded; stopped long before
                if stop.is_set():
                    return
                try:
                    r = client.get(weather.url, params={"city": "Paris"})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                answered[r.json()["instance"]] += 1
                if killed.is_set():
                    after_kill[r.json()["instance"]] += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        victim = weather.forecasts[0]
        wait_until(lambda: answered[victim.address] >= 5, timeout=30, what="traffic to victim")
        victim.kill()
        killed.set()
        wait_until(lambda: sum(after_kill.values()) >= 150, timeout=60, what="150 more answers")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    survivors = {f.address for f in weather.forecasts[1:]}
    assert set(after_kill) - {victim.address} == survivors, after_kill


def test_meshlib_demo_runs_the_weather_mesh_with_no_failed_request() -> None:
    """The demo, shortened: strict mTLS from a local CA, an instance killed, a canary, a
    trace."""
    result = subprocess.run(
        [sys.executable, "-m", "meshlib", "demo", "--duration", "12"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "strict mTLS" in out
    assert re.search(r"kill -9 forecast 127\.0\.0\.1:\d+", out), out
    assert "canary: forecast v2 gets 10%" in out
    assert "canary promoted: forecast v2 gets 100%" in out
    canary = re.search(r"^\s+forecast v2 \S+\s+(\d+)", out, re.M)
    assert canary is not None, out
    assert int(canary.group(1)) > 0  # the canary took traffic once the split let it
    assert re.search(r"sample trace [0-9a-f]{32}: \d+ spans", out), out
    summary = re.search(r"^summary: (\d+) requests in [\d.]+ s, (\d+) failed$", out, re.M)
    assert summary is not None, out
    assert int(summary.group(1)) > 50
    assert summary.group(2) == "0"
    assert "every process the demo started has been stopped" in out


def test_meshlib_demo_installs_from_the_wheel_and_runs_in_an_empty_directory(
    tmp_path: Path,
) -> None:
    """A wheel built from this checkout, installed with its demo extra into a fresh venv, runs
    the demo from an empty directory with no failed request, and serves the dashboard while
    it runs."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("meshlib-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[demo]"],
        check=True,
        timeout=900,
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MESH_", "CONSUL_", "OTEL_", "PYTHON", "VIRTUAL_ENV"))
    }
    demo = subprocess.Popen(
        [str(venv / "bin" / "meshlib"), "demo", "--duration", "10s"],
        cwd=empty,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert demo.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(demo.stdout or ()), daemon=True)
    reader.start()
    try:

        def announced() -> str | None:
            for line in lines:
                if m := re.search(r"open (http://\S+)", line):
                    return m.group(1)
            if demo.poll() is not None:
                pytest.fail(f"the demo exited ({demo.returncode}): {''.join(lines)}")
            return None

        url = wait_until(announced, timeout=60, what="the dashboard's URL")

        def served() -> set[str]:
            try:
                view = httpx.get(f"{url}api/mesh", timeout=5).json()
            except httpx.HTTPError:
                return set()
            names = {n["name"] for n in view.get("nodes", [])}
            return names if {"gateway", "forecast", "geo"} <= names else set()

        wait_until(served, timeout=60, interval=0.5, what="the demo's services on the dashboard")
        for asset in ("", "dashboard.js", "dashboard.css"):  # the page ships in the wheel
            assert httpx.get(url + asset, timeout=5).status_code == 200, asset
        assert demo.wait(180) == 0, "".join(lines)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        reader.join(10)
        demo.stdout.close()
    out = "".join(lines)
    assert str(venv) in (venv / "bin" / "meshlib").read_text()  # the venv's own meshlib
    summary = re.search(r"^summary: (\d+) requests in [\d.]+ s, (\d+) failed$", out, re.M)
    assert summary is not None, out
    assert int(summary.group(1)) > 20
    assert summary.group(2) == "0"
    assert "every process the demo started has been stopped" in out


def test_meshlib_demo_with_consul_splits_the_canary_with_consul_config_entries(
    consul_factory: ConsulFactory,
) -> None:
    """The demo against a Consul agent: discovery, Connect certificates, and the canary
    through a service-splitter in Consul that the gateway follows; Consul left as found."""
    agent = consul_factory()
    result = subprocess.run(
        [sys.executable, "-m", "meshlib", "demo", "--duration", "14"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "CONSUL_HTTP_ADDR": agent.http_addr},
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"Consul at {agent.http_addr}" in out
    assert "canary: forecast v2 gets 10% (service-splitter 90/10 in Consul)" in out
    canary = re.search(r"^\s+forecast v2 \S+\s+(\d+)", out, re.M)
    assert canary is not None, out
    assert int(canary.group(1)) > 0  # the gateway followed Consul's split
    summary = re.search(r"^summary: (\d+) requests in [\d.]+ s, (\d+) failed$", out, re.M)
    assert summary is not None, out
    assert summary.group(2) == "0"
    for kind in ("service-splitter", "service-resolver", "service-defaults"):
        r = httpx.get(f"{agent.url}/v1/config/{kind}/forecast", timeout=10)
        assert r.status_code == 404, f"the demo left its {kind} behind"
