"""Where the dashboard finds the mesh's admin listeners: a static list, Consul or Prometheus.

Every meshlib process answers ``/mesh/metrics``, ``/mesh/status`` and ``/mesh/health`` on its
admin listener (``MESH_ADMIN_ADDR``). ``meshlib serve`` registers that listener's port in
Consul as ``Meta.admin-port`` (the check Consul runs goes there too), and Prometheus knows
the listeners it scrapes; so the dashboard asks whichever it was given, each poll, and sees
instances come and go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..rollout import ConsulAPI, RolloutError

__all__ = ["TargetSource", "consul_targets", "prometheus_targets", "static_targets"]

#: returns the base URLs (``http://host:port``) of the admin listeners to read
TargetSource = Callable[[], list[str]]


def static_targets(addresses: Sequence[str]) -> TargetSource:
    """A fixed list of ``host:port`` (or ``http://host:port``) admin listeners."""
    urls = [a if "://" in a else f"http://{a}" for a in addresses]
    return lambda: list(urls)


def consul_targets(api: ConsulAPI) -> TargetSource:
    """Every registered instance that names its admin port (``Meta.admin-port``), healthy or
    not: a failing instance is worth seeing."""

    def targets() -> list[str]:
        try:
            services, _ = api.call("GET", "/v1/catalog/services")
        except RolloutError:
            return []
        found: list[str] = []
        for name in sorted(services or {}):
            try:
                entries, _ = api.call("GET", f"/v1/health/service/{name}")
            except RolloutError:
                continue
            for entry in entries or []:
                url = _admin_url(entry)
                if url and url not in found:
                    found.append(url)
        return found

    return targets


def _admin_url(entry: dict[str, Any]) -> str:
    service = entry.get("Service") or {}
    port = (service.get("Meta") or {}).get("admin-port")
    if not port:
        return ""
    host = service.get("Address") or (entry.get("Node") or {}).get("Address") or "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def prometheus_targets(prometheus: str, timeout: float = 5.0) -> TargetSource:
    """The listeners Prometheus scrapes at ``/mesh/metrics`` (its active targets)."""

    def targets() -> list[str]:
        try:
            response = httpx.get(f"{prometheus}/api/v1/targets", timeout=timeout)
            response.raise_for_status()
            active = response.json()["data"]["activeTargets"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []
        found: list[str] = []
        for target in active:
            url = urlsplit(str(target.get("scrapeUrl", "")))
            if url.path in ("/mesh/metrics", "/metrics") and url.netloc:
                base = f"{url.scheme}://{url.netloc}"
                if base not in found:
                    found.append(base)
        return found

    return targets
