"""``meshlib dashboard`` end to end: gateway -> forecast -> geo (two instances) as real
``meshlib serve`` processes under permissive mTLS, known traffic sent through them, and the
dashboard's JSON (``/api/mesh``) and page checked against it; then the same page rendered by
a real headless Chromium and its DOM read back."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends import free_port
from consul_agent import ConsulAgent
from meshlib._config import load_config
from meshlib.rollout import ConsulAPI, Measurement, RolloutState, Settings
from meshlib.rollout._state import StateStore
from meshlib.security import LocalCA
from missing_tools import require_tool
from polling import wait_until
from prometheus_server import Prometheus
from served import Served

#: requests the test sends through the gateway, and how many of them fail (forecast's 500)
SENT, FAILED = 40, 10


def test_edges_from_two_scrapes_count_rates_errors_a_reset_and_p99_as_promql_does() -> None:
    from meshlib.dashboard._edges import edges
    from meshlib.telemetry._exposition import parse

    def scrape(ok: int, failed: int, buckets: tuple[int, int, int]) -> str:
        metric, edge = (
            "http_client_request_duration_seconds",
            'service_name="a",service_peer_name="b"',
        )
        lines = [
            f'x_count{{{edge},http_response_status_code="200"}} 1',  # another metric: ignored
            f'{metric}_count{{{edge},http_response_status_code="200"}} {ok}',
            f'{metric}_count{{{edge},http_response_status_code="503"}} {failed}',
            f"{metric}_count{{{edge}}} 0",  # transport errors carry no status code
        ]
        for le, count in zip(("0.1", "0.5", "+Inf"), buckets, strict=True):
            lines.append(f'{metric}_bucket{{{edge},le="{le}"}} {count}')
        return "# HELP ignored\n" + "\n".join(lines) + "\n"

    older = {"http://p": parse(scrape(100, 10, (100, 110, 110)))}
    newer = {"http://p": parse(scrape(180, 30, (150, 210, 210)))}
    (row,) = edges(newer, older, 10.0)
    assert (row["source"], row["target"], row["total"], row["errors"]) == ("a", "b", 210, 30)
    assert row["rps"] == 10.0  # (80 + 20) / 10 s
    assert row["error_rate"] == 0.2
    # 100 new observations: rank 99 lies in (0.1, 0.5], which holds 50 of them, 50 below it
    assert row["p99_ms"] == pytest.approx((0.1 + 0.4 * (99 - 50) / 50) * 1000)
    # the process restarted: its counters went down, their new values are the increase
    (reset,) = edges({"http://p": parse(scrape(5, 5, (10, 10, 10)))}, newer, 10.0)
    assert (reset["rps"], reset["error_rate"]) == (1.0, 0.5)
    # the first scrape has no rates yet, only counts
    (first,) = edges(newer, None, 0.0)
    assert (first["rps"], first["error_rate"], first["total"]) == (None, None, 210)


class Mesh:
    def __init__(self, ca_dir: Path) -> None:
        LocalCA(ca_dir).init("meshlib.test")
        common = {
            "MESH_TLS": "permissive",  # the services speak mTLS; the test calls in plaintext
            "MESH_TLS_DIR": str(ca_dir),
            "MESH_TLS_CA": "local",  # the test's own CA, signing in each process
            "MESH_SHUTDOWN_DELAY": "100ms",
        }
        gateway_port, forecast_port = free_port(), free_port()
        geo_ports = free_port(), free_port()
        self.geos = [
            Served("chain_app:app", {**common, "MESH_SERVICE_NAME": "geo"}, port=port)
            for port in geo_ports
        ]
        self.forecast = Served(
            "chain_app:app",
            {
                **common,
                "MESH_SERVICE_NAME": "forecast",
                "MESH_STATIC_SERVICES": "geo=" + ",".join(f"127.0.0.1:{p}" for p in geo_ports),
                # round robin keeps offering the killed instance its turn until it is ejected
                "MESH_LB": "round_robin",
                "MESH_OUTLIER_EJECTION_TIME": "30s",
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
        self.all = (self.gateway, self.forecast, *self.geos)
        #: requests the tests sent through the gateway, and how many forecast failed
        self.sent = self.failed = 0
        try:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(Served.start, self.all))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for served in self.all:
            served.stop()


class Dashboard:
    """``meshlib dashboard --admin ...`` as a real process."""

    def __init__(
        self, admins: list[str], *, args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "meshlib", "dashboard", "--port", str(self.port)]
        argv += ["--interval", "1s", "--window", "60s", *args]
        for admin in admins:
            argv += ["--admin", admin]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_"))},
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert f"on http://127.0.0.1:{self.port}/" in line, line
        self.url = f"http://127.0.0.1:{self.port}/"

    def view(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}api/mesh", timeout=5).json())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path_factory.mktemp("ca"))
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def dashboard(mesh: Mesh) -> Iterator[Dashboard]:
    dashboard = Dashboard([s.admin_address for s in mesh.all])
    # the first poll is the baseline the rates are measured from
    wait_until(lambda: dashboard.view().get("time"), timeout=20, what="the first poll")
    yield dashboard
    dashboard.stop()


@pytest.fixture(scope="module")
def traffic(mesh: Mesh, dashboard: Dashboard) -> None:
    """SENT requests through the gateway, FAILED of them answered 500 by forecast."""
    _send(mesh, SENT, FAILED)


def _send(mesh: Mesh, requests: int, failing: int) -> None:
    with httpx.Client(base_url=mesh.gateway.url, timeout=20) as client:
        for i in range(requests):
            r = client.get("/plan", params={"fail": int(i < failing)})
            assert r.status_code == (500 if i < failing else 200), r.text
            mesh.sent += 1
            mesh.failed += i < failing


def _edge(view: dict[str, Any], source: str, target: str) -> dict[str, Any] | None:
    return next((e for e in view["edges"] if e["source"] == source and e["target"] == target), None)


def _counted(dashboard: Dashboard) -> dict[str, Any] | None:
    view = dashboard.view()
    front, back = _edge(view, "gateway", "forecast"), _edge(view, "forecast", "geo")
    if front is None or back is None or front["total"] != SENT or back["total"] != SENT:
        return None
    return view


def test_the_json_view_shows_the_services_the_calls_and_the_traffic_sent(
    mesh: Mesh, dashboard: Dashboard, traffic: None
) -> None:
    view = wait_until(lambda: _counted(dashboard), timeout=20, what="the traffic counted")

    assert [n["name"] for n in view["nodes"]] == ["forecast", "gateway", "geo"]
    nodes = {n["name"]: n for n in view["nodes"]}
    assert nodes["geo"]["up"] == 2
    assert nodes["gateway"]["up"] == nodes["forecast"]["up"] == 1
    for node in nodes.values():
        assert node["tls"] == "permissive"
        # a LocalCA leaf lives MESH_TLS_LEAF_TTL (hours), never less than a minute from now
        assert 60 < node["certificate_expires_in_s"] < 48 * 3600
    assert [(e["source"], e["target"]) for e in view["edges"]] == [
        ("forecast", "geo"),
        ("gateway", "forecast"),
    ]
    front, back = _edge(view, "gateway", "forecast"), _edge(view, "forecast", "geo")
    assert front is not None
    assert back is not None
    # counts are the traffic sent; rates cover the window, which holds all of it
    assert (front["total"], front["errors"]) == (SENT, FAILED)
    assert (back["total"], back["errors"]) == (SENT, 0)
    assert front["error_rate"] == pytest.approx(FAILED / SENT)
    assert back["error_rate"] == 0
    for edge in (front, back):
        assert edge["rps"] > 0
        assert 0 < edge["p99_ms"] < 10_000
    # forecast's balancer knows both geo instances, healthy, with a latency estimate
    geo = view["services"]["geo"]
    assert [i["address"] for i in geo["instances"]] == sorted(s.address for s in mesh.geos)
    for instance in geo["instances"]:
        assert instance["healthy"]
        assert not instance["ejected"]
        assert instance["seen_by"] == ["forecast"]
        assert instance["latency_ms"] is not None
    assert geo["breakers"] == {"forecast": "closed"}
    assert view["services"]["forecast"]["breakers"] == {"gateway": "closed"}
    assert view["errors"] == []


def test_the_page_and_its_assets_are_served_from_the_package(dashboard: Dashboard) -> None:
    page = httpx.get(dashboard.url, timeout=5)
    assert page.status_code == 200
    assert 'src="dashboard.js"' in page.text
    for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        r = httpx.get(dashboard.url + asset, timeout=5)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith(kind)
    assert "http" not in page.text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_with_prometheus_the_edges_come_from_its_queries_and_the_processes_from_its_targets(
    mesh: Mesh, traffic: None, tmp_path: Path
) -> None:
    targets = {"gateway": mesh.gateway, "forecast": mesh.forecast, "geo-1": mesh.geos[0]}
    targets["geo-2"] = mesh.geos[1]
    prometheus = Prometheus(
        tmp_path, {job: s.admin_address for job, s in targets.items()}, "/mesh/metrics"
    )
    dashboard = Dashboard([], args=("--prometheus", prometheus.url))
    try:
        # rates need two scrapes of each series before the traffic below
        wait_until(
            lambda: len(prometheus.query("http_client_request_duration_seconds_count")) >= 3,
            timeout=30,
            what="Prometheus to scrape the edges",
        )
        _send(mesh, 20, 5)

        def measured() -> dict[str, Any] | None:
            view = dashboard.view()
            front, back = _edge(view, "gateway", "forecast"), _edge(view, "forecast", "geo")
            if view.get("source") != "prometheus" or not front or not back:
                return None
            return view if front["error_rate"] and back["rps"] else None

        view = wait_until(measured, timeout=30, interval=0.5, what="Prometheus's edges")
        front, back = _edge(view, "gateway", "forecast"), _edge(view, "forecast", "geo")
        assert front is not None
        assert back is not None
        assert front["error_rate"] == pytest.approx(0.25, abs=0.05)  # 5 of 20 failed
        assert back["error_rate"] == 0
        assert front["rps"] > 0
        assert back["rps"] > 0
        assert front["p99_ms"] > 0
        nodes = {n["name"]: n for n in view["nodes"]}
        assert {p["admin"] for p in nodes["geo"]["processes"]} == {s.admin_url for s in mesh.geos}
        assert nodes["gateway"]["up"] == nodes["forecast"]["up"] == 1
    finally:
        dashboard.stop()
        prometheus.stop()


def test_with_consul_it_finds_registered_admin_ports_and_shows_rollouts(
    mesh: Mesh, consul: ConsulAgent
) -> None:
    service = f"dash-{uuid.uuid4().hex[:8]}"
    geo = mesh.geos[0]
    registration = {
        "ID": f"{service}-1",
        "Name": service,
        "Address": "127.0.0.1",
        "Port": geo.port,
        "Meta": {"admin-port": str(geo.admin_port)},
    }
    httpx.put(f"{consul.url}/v1/agent/service/register", json=registration).raise_for_status()
    api = ConsulAPI(load_config({"CONSUL_HTTP_ADDR": consul.http_addr}).consul)  # type: ignore[arg-type]
    store = StateStore(api, service)
    settings = Settings(mode="canary", canary="v2", stable="v1", canary_version="v2")
    state = RolloutState(
        service=service,
        settings=settings,
        weight=30,
        step=3,
        failed_checks=1,
        last=Measurement(requests=120, success_rate=99.5, p99=0.042),
        verdict="pass",
        updated=time.time(),
    )
    assert store.save(state, 0)
    dashboard = Dashboard([], env={"CONSUL_HTTP_ADDR": consul.http_addr})
    try:

        def shown() -> dict[str, Any] | None:
            view = dashboard.view()
            ours = [r for r in view.get("rollouts", []) if r["service"] == service]
            return view if ours and any(n["name"] == "geo" for n in view["nodes"]) else None

        view = wait_until(shown, timeout=20, interval=0.5, what="Consul's instances, rollout")
        geo_node = next(n for n in view["nodes"] if n["name"] == "geo")
        assert geo.admin_url in {p["admin"] for p in geo_node["processes"]}
        (rollout,) = [r for r in view["rollouts"] if r["service"] == service]
        assert (rollout["phase"], rollout["weight"], rollout["stable"], rollout["canary"]) == (
            "progressing",
            30,
            "v1",
            "v2",
        )
        assert (rollout["step"], rollout["failed_checks"], rollout["verdict"]) == (3, 1, "pass")
        assert rollout["metrics"]["requests"] == 120
        assert rollout["metrics"]["p99_seconds"] == pytest.approx(0.042)
    finally:
        dashboard.stop()
        store.delete()
        api.close()
        httpx.put(f"{consul.url}/v1/agent/service/deregister/{service}-1").raise_for_status()


def _geo_state(dashboard: Dashboard, address: str) -> dict[str, Any]:
    view = dashboard.view()
    instances = view["services"]["geo"]["instances"]
    return next(i for i in instances if i["address"] == address)


def test_a_killed_instance_shows_ejected_within_seconds_in_the_json_and_the_browser(
    mesh: Mesh, dashboard: Dashboard, traffic: None, tmp_path: Path
) -> None:
    _browser_checks(mesh, dashboard, tmp_path, before_kill=True)
    victim = mesh.geos[1]
    assert victim.proc is not None
    victim.proc.kill()  # SIGKILL: no deregistration, no drain
    victim.wait()
    killed = time.monotonic()
    with httpx.Client(base_url=mesh.gateway.url, timeout=20) as client:

        def ejected() -> bool:
            assert client.get("/plan").status_code == 200  # retried on the other instance
            return bool(_geo_state(dashboard, victim.address)["ejected"])

        wait_until(ejected, timeout=15, interval=0.2, what="the killed geo shown ejected")
    shown_after = time.monotonic() - killed
    print(f"the killed geo showed ejected on the dashboard {shown_after:.1f} s after SIGKILL")
    assert shown_after < 15
    view = dashboard.view()
    geo_node = next(n for n in view["nodes"] if n["name"] == "geo")
    # its admin listener is gone too: the process shows down under its service
    assert geo_node["up"] == 1
    assert [p["up"] for p in geo_node["processes"]] == [True, False]
    assert any(victim.admin_address in error for error in view["errors"])
    _browser_checks(mesh, dashboard, tmp_path, before_kill=False)


class Chromium:
    """Debian's headless Chromium: the page's DOM once its script has run, and a screenshot."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.argv = [
            binary,
            "--headless",
            "--no-sandbox",  # tests may run as root, where the sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--window-size=1280,1000",
            # the page's fetch and redraw run on virtual time; this lets them finish
            "--virtual-time-budget=5000",
        ]

    def dom(self, url: str) -> str:
        done = subprocess.run(
            [*self.argv, "--dump-dom", url], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def screenshot(self, url: str, path: Path) -> None:
        done = subprocess.run(
            [*self.argv, f"--screenshot={path}", url], capture_output=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Dom(HTMLParser):
    """The rendered page's edges, nodes and instance rows, by their data- attributes."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.edges: dict[tuple[str, str], dict[str, str]] = {}
        self.nodes: dict[str, dict[str, str]] = {}
        self.instances: dict[str, dict[str, str]] = {}
        self.polls = 0
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "g" and "data-target" in a:
            self.edges[(a["data-source"], a["data-target"])] = a
        elif tag == "g" and "data-name" in a:
            self.nodes[a["data-name"]] = a
        elif tag == "tr" and "data-address" in a:
            self.instances[a["data-address"]] = a
        elif a.get("id") == "updated":
            self.polls = int(a.get("data-polls") or 0)


def _rendered(chromium: Chromium, url: str, check: Callable[[_Dom], bool]) -> _Dom:
    def attempt() -> _Dom | None:
        dom = _Dom(chromium.dom(url))
        return dom if dom.polls and check(dom) else None

    return wait_until(attempt, timeout=60, interval=0.5, what="the page to show it")


def _browser_checks(mesh: Mesh, dashboard: Dashboard, tmp_path: Path, *, before_kill: bool) -> None:
    """The page as a real browser renders it shows what the JSON says (skipped, with how
    to get Chromium, where it cannot be had)."""
    if os.environ.get("MESH_TEST_NO_BROWSER"):
        return
    chromium = Chromium(require_tool("chromium"), tmp_path / "profile")
    if before_kill:
        dom = _rendered(
            chromium,
            dashboard.url,
            lambda d: d.edges.get(("gateway", "forecast"), {}).get("data-total") == str(mesh.sent),
        )
        assert set(dom.nodes) == {"gateway", "forecast", "geo"}
        # within one page load the script fetched and redrew more than once: live, no reload
        assert dom.polls >= 2, dom.polls
        assert dom.nodes["geo"]["data-up"] == "2"
        front, back = dom.edges[("gateway", "forecast")], dom.edges[("forecast", "geo")]
        assert (front["data-total"], front["data-errors"]) == (str(mesh.sent), str(mesh.failed))
        assert (back["data-total"], back["data-errors"]) == (str(mesh.sent), "0")
        assert float(front["data-error-rate"]) > 0.05
        assert "failing" in front["class"].split()  # 25% errors: drawn red
        assert "failing" not in back["class"].split()
        assert {s.address for s in mesh.geos} <= set(dom.instances)
        chromium.screenshot(dashboard.url, tmp_path / "dashboard.png")
        return
    victim = mesh.geos[1].address
    dom = _rendered(
        chromium,
        dashboard.url,
        lambda d: d.instances.get(victim, {}).get("data-state") == "ejected",
    )
    assert "ejected" in dom.instances[victim]["class"]
    assert dom.nodes["geo"]["data-up"] == "1"
    assert "down" in dom.nodes["geo"]["class"].split()
    shot = tmp_path / "dashboard-ejected.png"
    chromium.screenshot(dashboard.url, shot)
    copy_to = os.environ.get("MESH_TEST_SCREENSHOTS")
    if copy_to:  # the documentation's screenshot comes from this run
        shutil.copyfile(shot, Path(copy_to) / "dashboard.png")
