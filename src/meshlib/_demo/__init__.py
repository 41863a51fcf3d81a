"""``meshlib demo``: the FastAPI weather system on loopback, and the mesh at work.

It starts the FastAPI weather example (examples/fastapi_weather, which the wheel carries as
``_demo/weather/`` so the demo runs from an installed wheel in any directory) as real
``meshlib serve`` processes (geo, two instances of forecast v1, gateway) with strict mTLS
from a local CA made in a temporary directory and static discovery (or the Consul agent at
``CONSUL_HTTP_ADDR``), drives traffic through the gateway from this process (a mesh client
itself), and shows what happens:

1. requests spread over the forecast instances;
2. one instance is killed (SIGKILL) and ejected, with no failed request;
3. it comes back and gets traffic again;
4. a canary of forecast v2 at 10% (a service-splitter in the local config file, or in
   Consul: _consul_split.py), then promoted;
5. the span tree of one request across the three services.

While it runs, ``meshlib dashboard`` serves the mesh as a web page on a loopback port (its
URL is printed first): the kill, the ejection, the recovery and the canary show there live.
It ends by itself, stops every process it started (by PID), and prints a summary.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import httpx

from .. import dashboard
from .._runtime import live_meshes
from ..client import Client
from ._processes import ServiceProcess
from ._system import EXAMPLE, Traffic, WeatherSystem
from ._traces import SpanRecord, TraceReceiver, span_tree
from ._view import View

__all__ = ["EXAMPLE", "run"]

_EJECTED = re.compile(
    r'^meshlib_client_endpoints\{[^}]*service_peer_name="forecast"[^}]*'
    r'meshlib_endpoint_state="ejected"[^}]*\} (\S+)$',
    re.MULTILINE,
)


def ejected_forecasts(gateway: ServiceProcess | None) -> int | None:
    """How many forecast endpoints the gateway has ejected (from its admin listener's
    /mesh/metrics)."""
    if gateway is None or not gateway.admin_url:
        return None
    try:
        text = httpx.get(f"{gateway.admin_url}/mesh/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    return sum(int(float(v)) for v in _EJECTED.findall(text))


def run(duration: float = 50.0, *, out: TextIO | None = None) -> int:
    """Run the demo for about ``duration`` seconds; 0 if no request failed."""
    out = out or sys.stdout
    if not (EXAMPLE / "gateway.py").exists():
        print(
            f"meshlib demo: its services are missing from {EXAMPLE}: reinstall meshlib[demo]",
            file=sys.stderr,
        )
        return 1
    consul = os.environ.get("CONSUL_HTTP_ADDR") or None
    view = View(out, duration)
    workdir = Path(tempfile.mkdtemp(prefix="meshlib-demo-"))
    receiver = TraceReceiver()
    system = WeatherSystem(workdir, receiver.endpoint, consul)
    traffic: Traffic | None = None
    board = _dashboard(system, view)
    try:
        where = f"Consul at {consul}" if consul else "static discovery, local CA"
        view.event(f"starting geo, forecast v1 x2, gateway ({where}, strict mTLS)")
        system.start()
        client = Client(config=system.client_config())
        traffic = Traffic(client)
        view.bind(traffic, system, lambda: ejected_forecasts(system.gateway))
        traffic.start()
        view.event("traffic: GET http://gateway/forecast?city=... from 4 workers")
        _timeline(duration, system, client, receiver, view)
        traffic.stop()
        client.close()
        view.final()
    except KeyboardInterrupt:
        view.event("interrupted")
    finally:
        if traffic is not None:
            traffic.stop()
        if board is not None:
            board.close()
        system.stop()
        receiver.close()
        for mesh in live_meshes():  # stops this process's certificate renewal before its CA goes
            mesh.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if traffic is None:
        return 1
    view.summary()
    return 0 if traffic.failures == 0 and traffic.requests > 0 else 1


def _dashboard(system: WeatherSystem, view: View) -> dashboard.DashboardServer | None:
    """``meshlib dashboard`` over the demo's processes (their admin listeners, read each poll:
    a restarted instance's new listener shows at once); None if no port could be had."""

    def targets() -> list[str]:
        return [p.admin_url for p in system.started if p.admin_url]

    try:
        server = dashboard.DashboardServer(
            dashboard.Collector(targets, window=10.0), "127.0.0.1", 0, interval=1.0
        )
    except OSError as exc:
        view.event(f"dashboard: not served ({exc})")
        return None
    view.event(f"dashboard: open {server.url} to watch the mesh (live while the demo runs)")
    return server.start()


def _timeline(
    duration: float, system: WeatherSystem, client: Client, receiver: TraceReceiver, view: View
) -> None:
    start = time.monotonic()

    def at(share: float) -> None:
        view.wait_until(start + share * duration)

    victim = system.forecasts[1]
    at(0.25)
    view.event(f"kill -9 forecast {victim.address} (pid {victim.proc.pid if victim.proc else '?'})")
    system.kill(victim)
    view.killed(victim.address)
    at(0.55)
    system.restart(victim)
    view.restarted(victim.address)
    view.event(f"restarted forecast on {victim.address}: it gets traffic once un-ejected")
    at(0.62)
    # --- canary: forecast v2 at 10%, then promoted --------------------------------------
    if system.canary is None:
        view.event(f"canary: skipped ({system.no_canary})")
    else:
        system.split(90, 10)
        where = "in Consul" if system.consul_split is not None else "in the config file"
        view.event(f"canary: forecast v2 gets 10% (service-splitter 90/10 {where})")
        at(0.74)
        system.split(0, 100)
        view.event("canary promoted: forecast v2 gets 100%")
    at(0.82)
    _sample_trace(client, receiver, view, start + duration)
    at(1.0)


def _sample_trace(client: Client, receiver: TraceReceiver, view: View, until: float) -> None:
    """One request with a sampled trace of its own; its spans, as a tree."""
    trace_id = secrets.token_hex(16)
    header = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    try:
        client.get(
            "http://gateway/forecast", params={"city": "Oslo"}, headers={"traceparent": header}
        )
    except httpx.HTTPError as exc:
        view.event(f"sample trace: the request failed: {exc}")
        return
    spans = _poll(lambda: _complete(receiver.trace(trace_id)), min(until, time.monotonic() + 10))
    view.trace(trace_id, span_tree(spans or receiver.trace(trace_id)))


def _complete(spans: list[SpanRecord]) -> list[SpanRecord] | None:
    services = {s.service for s in spans}
    return spans if {"gateway", "forecast", "geo"} <= services else None


def _poll(check: Callable[[], list[SpanRecord] | None], until: float) -> list[SpanRecord] | None:
    while True:
        found = check()
        if found or time.monotonic() >= until:
            return found
        time.sleep(0.1)  # the services export spans every 200 ms
