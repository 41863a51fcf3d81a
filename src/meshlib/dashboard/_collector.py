"""The dashboard's data: one poll reads every admin listener and assembles one JSON view.

Each poll reads, from every admin listener the target source names, ``/mesh/health`` (who
it is), ``/mesh/status`` (the instances it calls, as its balancer sees them: health,
ejection, in-flight requests, latency estimate, breaker; and for a server its TLS mode) and,
``/mesh/metrics`` (certificate expiry; and the edges, unless Prometheus is given). The
listeners are read concurrently with a short timeout, so one dead process costs one
timeout, not one per route. Edges come from
Prometheus (the queries of ``meshlib top``) or from the increase between this scrape and the
oldest one inside the window (``_edges``). Rollouts are read the way ``meshlib rollout
status`` reads them: each service's state in Consul KV.

The JSON (``snapshot()``, served at ``/api/mesh``)::

    {"time", "source": "prometheus"|"admin", "window_s",
     "nodes": [{"name", "processes", "up", "tls", "certificate_expires", ...}],
     "edges": [{"source", "target", "rps", "error_rate", "p99_ms", "total", "errors"}],
     "services": {name: {"instances": [...], "breakers": {caller: state}}},
     "rollouts": [event_json(...)], "errors": [...]}
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

import httpx

from ..rollout import ConsulAPI, RolloutError
from ..rollout._state import StateStore
from ..rollout._view import event_json
from ..telemetry._exposition import Samples, parse
from ..telemetry._top import edges as prometheus_edges
from ._edges import Scrape, edges
from ._targets import TargetSource

__all__ = ["Collector"]

_EXPIRY = "meshlib_certificate_expiry_seconds"
_ROLLOUTS = "meshlib/rollouts/"


class _Read:
    """What one admin listener answered in one poll."""

    __slots__ = ("error", "health", "samples", "service", "status", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self.service = ""
        self.health: dict[str, Any] | None = None
        self.status: dict[str, Any] | None = None
        self.samples: Samples | None = None
        self.error = ""


class Collector:
    """Polls the mesh; ``snapshot()`` is the newest view (thread-safe)."""

    def __init__(
        self,
        targets: TargetSource,
        *,
        prometheus: str | None = None,
        consul: ConsulAPI | None = None,
        window: float = 30.0,
        timeout: float = 2.0,
    ) -> None:
        self.targets = targets
        self.prometheus = prometheus
        self.consul = consul
        self.window = window
        self.timeout = timeout
        self._history: deque[tuple[float, Scrape]] = deque()
        self._client = httpx.Client(timeout=timeout)
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="meshlib-dashboard")
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {"nodes": [], "edges": [], "services": {}}
        #: listener URL -> the service it answered for: a process that stops answering
        #: still shows, down, under its service
        self._names: dict[str, str] = {}

    def close(self) -> None:
        """Stop the readers and close the connections."""
        self._pool.shutdown(wait=True)
        self._client.close()

    def snapshot(self) -> dict[str, Any]:
        """The newest view (empty until the first ``poll``)."""
        with self._lock:
            return self._snapshot

    def poll(self) -> dict[str, Any]:
        """Read the mesh once and make that the newest view."""
        now = time.time()
        urls = self.targets()
        reads = list(self._pool.map(self._read, urls))
        for read in reads:
            if read.health and read.health.get("service"):
                self._names[read.url] = str(read.health["service"])
            read.service = self._names.get(read.url, "")
        errors = [f"{r.url}: {r.error}" for r in reads if r.error]
        view: dict[str, Any] = {
            "time": now,
            "source": "prometheus" if self.prometheus else "admin",
            "window_s": self.window,
        }
        if self.prometheus:
            view["edges"] = self._prometheus_edges(errors)
        else:
            scrape: Scrape = {r.url: r.samples for r in reads}
            older = self._remember(now, scrape)
            seconds = now - older[0] if older is not None else 0.0
            view["edges"] = edges(scrape, older[1] if older is not None else None, seconds)
        view["nodes"], view["services"] = _services(reads, view["edges"], now)
        view["rollouts"] = self._rollouts(errors)
        view["errors"] = errors
        with self._lock:
            self._snapshot = view
        return view

    def _remember(self, now: float, scrape: Scrape) -> tuple[float, Scrape] | None:
        """Keep ``scrape``; return the oldest one still inside the window (None: first)."""
        history = self._history
        history.append((now, scrape))
        while len(history) > 2 and history[1][0] <= now - self.window:
            history.popleft()
        return history[0] if len(history) > 1 else None

    def _read(self, url: str) -> _Read:
        read = _Read(url)
        try:
            read.health = self._client.get(f"{url}/mesh/health").json()
            status = self._client.get(f"{url}/mesh/status")
            if status.status_code == 200:
                read.status = status.json()
            read.samples = parse(self._client.get(f"{url}/mesh/metrics").text)
        except (httpx.HTTPError, ValueError) as exc:
            read.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return read

    def _prometheus_edges(self, errors: list[str]) -> list[dict[str, Any]]:
        assert self.prometheus is not None
        window = f"{max(1, round(self.window))}s"
        try:
            found = prometheus_edges(self.prometheus, window, timeout=self.timeout)
        except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
            errors.append(f"Prometheus at {self.prometheus}: {exc}")
            return []
        return [
            {
                "source": e.source,
                "target": e.target,
                "rps": round(e.rps, 3),
                "error_rate": None if math.isnan(e.success) else round(1 - e.success, 4),
                "p99_ms": None if math.isnan(e.p99) else round(e.p99 * 1000, 2),
                "total": None,
                "errors": None,
            }
            for e in found
        ]

    def _rollouts(self, errors: list[str]) -> list[dict[str, Any]]:
        if self.consul is None:
            return []
        try:
            keys, _ = self.consul.call(
                "GET", f"/v1/kv/{_ROLLOUTS}", params={"keys": "true"}, missing_ok=True
            )
            found = []
            for key in sorted(keys or []):
                service, _, leaf = key.removeprefix(_ROLLOUTS).rpartition("/")
                if leaf != "state" or not service:
                    continue
                state, _ = StateStore(self.consul, unquote(service)).load()
                if state is not None:
                    found.append(event_json("status", state))
            return found
        except RolloutError as exc:
            errors.append(f"rollouts: {exc}")
            return []


def _services(
    reads: list[_Read], edge_rows: list[dict[str, Any]], now: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Nodes (one per service, from its own listeners and the edges) and, per service, its
    instances as its callers see them."""
    nodes: dict[str, dict[str, Any]] = {}

    def node(name: str) -> dict[str, Any]:
        if name not in nodes:
            nodes[name] = {
                "name": name,
                "processes": [],
                "up": 0,
                "tls": None,
                "certificate_expires": None,
                "certificate_expires_in_s": None,
            }
        return nodes[name]

    services: dict[str, Any] = {}
    for read in reads:
        health = read.health or {}
        name = read.service
        status = read.status or {}
        inbound = status.get("inbound") or {}
        if name:
            entry = node(name)
            entry["processes"].append(
                {
                    "admin": read.url,
                    "up": not read.error,
                    "state": health.get("status"),
                    "version": health.get("version"),
                    "in_flight": health.get("in_flight"),
                    "error": read.error or None,
                }
            )
            entry["up"] += 0 if read.error else 1
            entry["tls"] = inbound.get("tls") or entry["tls"]
            for (metric, labels), value in (read.samples or {}).items():
                if metric == _EXPIRY and dict(labels).get("service") in (name, None):
                    earliest = entry["certificate_expires"]
                    entry["certificate_expires"] = (
                        value if earliest is None else min(earliest, value)
                    )
            if entry["certificate_expires"] is not None:
                entry["certificate_expires_in_s"] = round(entry["certificate_expires"] - now)
        caller = name or read.url
        for callee, seen in (status.get("services") or {}).items():
            service = services.setdefault(callee, {"instances": {}, "breakers": {}})
            service["breakers"][caller] = seen.get("breaker")
            for endpoint in seen.get("endpoints") or []:
                _merge(service["instances"], endpoint, caller)
    for row in edge_rows:
        node(row["source"] or "(client)")
        node(row["target"])
    for callee in services:
        node(callee)
    for service in services.values():
        service["instances"] = sorted(service["instances"].values(), key=lambda i: i["address"])
    return sorted(nodes.values(), key=lambda n: n["name"]), services


def _merge(instances: dict[str, Any], endpoint: dict[str, Any], caller: str) -> None:
    """One caller's view of an instance, merged into what other callers saw: unhealthy or
    ejected if any caller says so, in-flight summed, the highest latency estimate."""
    address = str(endpoint.get("address"))
    ejected_for = float(endpoint.get("ejected_for_s") or 0.0)
    latency = endpoint.get("latency_ms")
    seen = instances.get(address)
    if seen is None:
        instances[address] = {
            "address": address,
            "version": endpoint.get("version") or "",
            "healthy": bool(endpoint.get("healthy", True)),
            "ejected": ejected_for > 0,
            "ejected_for_s": ejected_for,
            "ejections": int(endpoint.get("ejections") or 0),
            "in_flight": int(endpoint.get("in_flight") or 0),
            "latency_ms": latency,
            "seen_by": [caller],
        }
        return
    seen["healthy"] = seen["healthy"] and bool(endpoint.get("healthy", True))
    seen["ejected"] = seen["ejected"] or ejected_for > 0
    seen["ejected_for_s"] = max(seen["ejected_for_s"], ejected_for)
    seen["ejections"] += int(endpoint.get("ejections") or 0)
    seen["in_flight"] += int(endpoint.get("in_flight") or 0)
    if isinstance(latency, int | float):
        current = seen["latency_ms"]
        seen["latency_ms"] = latency if current is None else max(current, latency)
    seen["seen_by"].append(caller)
