"""The shipped alerts, end to end: real ``meshlib serve`` processes scraped by a real
Prometheus running the shipped rules, which sends to a real Alertmanager running the shipped
configuration, which notifies a webhook receiver in the test.

To keep a run under two minutes the test's copy of the rules runs on a faster clock: every
minute in a rule (``for:`` and range windows) becomes 3 seconds (``[5m]`` -> ``[15s]``,
``for: 3m`` -> ``for: 9s``, ``[1h]`` -> ``[180s]``), with Prometheus scraping and evaluating
every second. The ratios between windows, holds and the breaker's timers are what the rules
rely on, and those are kept. Alertmanager's grouping timers are shortened as
``alertmanager_server.config_for`` says.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from alertmanager_server import Alertmanager, WebhookReceiver, config_for
from backends import free_port
from polling import wait_until
from prometheus_server import Prometheus
from served import Served

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "meshlib-alerts.yml"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"

#: seconds of test time per minute of rule time
SECONDS_PER_MINUTE = 3
#: the edge error-rate window (5m in the rules), in test seconds
ERROR_WINDOW = 5 * SECONDS_PER_MINUTE
_DURATION = re.compile(r"(\[|for: )(\d+)([mh])\b")


def fast_rules(text: str) -> str:
    """The rules with every minute in a window or hold made ``SECONDS_PER_MINUTE`` seconds."""

    def scaled(match: re.Match[str]) -> str:
        minutes = int(match.group(2)) * (60 if match.group(3) == "h" else 1)
        return f"{match.group(1)}{minutes * SECONDS_PER_MINUTE}s"

    return _DURATION.sub(scaled, text)


def test_fast_rules_scale_windows_and_holds() -> None:
    assert fast_rules("rate(x[5m]) for: 3m max_over_time(y[1h])") == (
        "rate(x[15s]) for: 9s max_over_time(y[180s])"
    )


class Mesh:
    """forecast calling geo (two instances), under steady load; only forecast is scraped."""

    def __init__(self, geo_faulty: bool) -> None:
        self.geo_ports = [free_port(), free_port()]
        self.geo = [
            self._geo(port, faulty=geo_faulty and i == 1) for i, port in enumerate(self.geo_ports)
        ]
        self.forecast = Served(
            "chain_app:app",
            {
                "MESH_SERVICE_NAME": "forecast",
                "MESH_STATIC_SERVICES": "geo=" + ",".join(f"127.0.0.1:{p}" for p in self.geo_ports),
                "MESH_OUTLIER_EJECTION_TIME": "1s",
                # the clock runs 20x fast for the rules; a failing instance is tried about
                # once a second (p2c_ewma avoids it between tries), so one failure ejects it,
                # or an ejection would come too seldom for the compressed 2-minute window
                "MESH_OUTLIER_CONSECUTIVE_ERRORS": "1",
                "MESH_BREAKER_FAILURES": "5",
                "MESH_BREAKER_RESET": "1s",
                "MESH_RETRY_BACKOFF": "1ms",
                "MESH_RETRY_BACKOFF_MAX": "5ms",
                "MESH_SHUTDOWN_DELAY": "100ms",
            },
        ).start()
        self._stop = threading.Event()
        self._load = threading.Thread(target=self._run, daemon=True)
        self._load.start()

    @staticmethod
    def _geo(port: int, *, faulty: bool) -> Served:
        env = {"MESH_SERVICE_NAME": "geo", "MESH_SHUTDOWN_DELAY": "100ms"}
        if faulty:  # an instance that answers 500 to everything
            env["MESH_FAULT_ABORT_STATUS"] = "500"
        return Served("chain_app:app", env, port=port).start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(0.02):
                with contextlib.suppress(httpx.HTTPError):
                    client.get(f"{self.forecast.url}/forecast")

    def restart_geo(self, index: int) -> None:
        """Replace geo instance ``index`` by a healthy one on the same port."""
        self.geo[index].stop()
        self.geo[index] = self._geo(self.geo_ports[index], faulty=False)

    def stop(self) -> None:
        self._stop.set()
        self._load.join(10)
        for served in (self.forecast, *self.geo):
            served.stop()


class Alerting:
    """Prometheus (the shipped rules, fast) -> Alertmanager (the shipped config) -> receiver."""

    def __init__(self, directory: Path, mesh: Mesh) -> None:
        self.receiver = WebhookReceiver()
        self.alertmanager = Alertmanager(directory, config_for(ALERTMANAGER, self.receiver))
        rules = directory / "meshlib-alerts.yml"
        rules.write_text(fast_rules(RULES.read_text()))
        self.prometheus = Prometheus(
            directory,
            {"forecast": mesh.forecast.admin_address},
            "/mesh/metrics",
            rule_files=(rules,),
            alertmanager=self.alertmanager.address,
        )

    def firing(self, alertname: str) -> bool:
        """Prometheus has ``alertname`` firing."""
        return bool(self.prometheus.query(f'ALERTS{{alertname="{alertname}",alertstate="firing"}}'))

    def active(self, alertname: str) -> bool:
        """Prometheus has ``alertname`` pending or firing."""
        return bool(self.prometheus.query(f'ALERTS{{alertname="{alertname}"}}'))

    def stop(self) -> None:
        self.prometheus.stop()
        self.alertmanager.stop()
        self.receiver.stop()


@pytest.fixture
def faulty_mesh() -> Iterator[Mesh]:
    mesh = Mesh(geo_faulty=True)
    try:
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture
def healthy_mesh() -> Iterator[Mesh]:
    mesh = Mesh(geo_faulty=False)
    try:
        yield mesh
    finally:
        mesh.stop()


def test_one_failed_instance_pages_and_its_recovery_resolves(
    faulty_mesh: Mesh, tmp_path: Path
) -> None:
    # one of geo's two instances answers 500 to everything: forecast ejects it, again and
    # again, and its error rate stays low (ejection hides the instance); it must page anyway
    alerting = Alerting(tmp_path, faulty_mesh)
    try:
        receiver = alerting.receiver
        paged = wait_until(
            lambda: receiver.alerts("on-call", "MeshlibEndpointEjected", "firing"),
            timeout=90,
            what=f"the ejection page (received so far: {receiver.names()})",
        )
        assert paged[0]["labels"]["service_name"] == "geo"
        assert paged[0]["labels"]["severity"] == "page"

        faulty_mesh.restart_geo(1)  # answers 200 again: readmitted, the alert resolves
        resolved = wait_until(
            lambda: receiver.alerts("on-call", "MeshlibEndpointEjected", "resolved"),
            timeout=90,
            what=f"the ejection's resolution (received so far: {receiver.names()})",
        )
        assert resolved[0]["labels"]["service_name"] == "geo"
    finally:
        alerting.stop()


def test_a_recovered_service_does_not_page_late(healthy_mesh: Mesh, tmp_path: Path) -> None:
    alerting = Alerting(tmp_path, healthy_mesh)
    try:
        receiver = alerting.receiver
        wait_until(
            lambda: alerting.prometheus.value("sum(meshlib_client_breaker_state)"),
            timeout=30,
            what="forecast's breaker for geo scraped",
        )
        for served in healthy_mesh.geo:  # geo is down: forecast's breaker opens
            served.stop()
        wait_until(
            lambda: receiver.alerts("on-call", "MeshlibCircuitBreakerOpen", "firing"),
            timeout=60,
            what=f"the breaker page (received so far: {receiver.names()})",
        )
        # the edge's error rate fires too, inhibited by the open breaker
        wait_until(
            lambda: alerting.firing("MeshlibEdgeErrorRate"), timeout=60, what="edge error rate"
        )
        for index in range(2):  # geo is back
            healthy_mesh.restart_geo(index)
        wait_until(
            lambda: receiver.alerts("on-call", "MeshlibCircuitBreakerOpen", "resolved"),
            timeout=60,
            what=f"the breaker's resolution (received so far: {receiver.names()})",
        )
        # the error-rate window still holds the outage's failures: the edge alert keeps
        # firing for a while after recovery, and must not page meanwhile. It must end while
        # the inhibition still holds: by design, with the error-rate window (15 s here) of
        # margin, not by timing luck (one minute of rule time, 3 s here, was too little for
        # a loaded machine)
        wait_until(
            lambda: not alerting.active("MeshlibEdgeErrorRate"),
            timeout=90,
            what="the edge alert over",
        )
        edge_over = time.monotonic()
        assert alerting.active("MeshlibCircuitBreakerRecentlyOpen"), (
            "the inhibition lapsed before the edge alert resolved"
        )
        # and its resolution reaches Alertmanager while the inhibition is in force there
        wait_until(
            lambda: (
                alerting.alertmanager.active_names() >= {"MeshlibCircuitBreakerRecentlyOpen"}
                and "MeshlibEdgeErrorRate" not in alerting.alertmanager.active_names()
            ),
            timeout=30,
            what="Alertmanager to hold the inhibition and no longer the edge alert",
        )
        wait_until(
            lambda: not alerting.active("MeshlibCircuitBreakerRecentlyOpen"),
            timeout=90,
            what="the inhibition over",
        )
        # the margin, as designed: the inhibition outlasts the edge alert by about the
        # error-rate window (15 s); at least half of it, whatever the scrapes' timing
        margin = time.monotonic() - edge_over
        assert margin >= ERROR_WINDOW / 2, (
            f"the inhibition outlasted the edge alert by {margin:.1f}s"
        )
        assert not receiver.alerts("on-call", "MeshlibEdgeErrorRate", "firing"), receiver.names()
        assert not [
            name for name in receiver.names() if name[1] == "MeshlibCircuitBreakerRecentlyOpen"
        ]
    finally:
        alerting.stop()
