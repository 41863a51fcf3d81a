"""What this process's mesh sees, as JSON: the answer of ``/mesh/status``.

Envoy's admin ``/clusters`` and ``linkerd diagnostics endpoints`` answer the question an
operator asks first when calls fail: which instances does this caller know, which did it
eject, is the breaker open? meshlib keeps that state inside the application, so the
application answers it: ``/mesh/status`` on the process's admin listener
(``MESH_ADMIN_ADDR``; loopback peers only, since it lists internal addresses), and
``meshlib status`` reads it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ._config import MeshConfig
from ._service import ServiceState
from ._version import __version__

__all__ = ["render", "status_report"]


class Runtime(Protocol):
    """What the report reads of a mesh runtime (``_runtime.Mesh``)."""

    config: MeshConfig

    def services(self) -> Mapping[str, ServiceState]:
        """The destinations it has called, by name."""
        ...


def status_report(meshes: Iterable[Runtime]) -> dict[str, Any]:
    """The services the process's live mesh runtimes (``meshes``) call, with endpoints."""
    now = time.monotonic()
    services: dict[str, Any] = {}
    for mesh in meshes:
        for name, state in sorted(mesh.services().items()):
            endpoints = []
            listed = [(s, True) for s in state.endpoints] + [(s, False) for s in state.unhealthy]
            for endpoint_state, healthy in listed:
                endpoint = endpoint_state.endpoint
                ejected_for = max(0.0, endpoint_state.ejected_until - now)
                latency = endpoint_state.ewma.cost(now)
                endpoints.append(
                    {
                        "address": endpoint.address,
                        "id": endpoint.id,
                        "healthy": healthy,
                        "version": endpoint.meta.get("version", ""),
                        "weight": endpoint_state.weight,
                        "in_flight": endpoint_state.in_flight,
                        "ejected_for_s": round(ejected_for, 3),
                        "ejections": endpoint_state.ejections,
                        "latency_ms": round(latency * 1000, 3) if latency else None,
                    }
                )
            services[name] = {
                "discovery": mesh.config.discovery,
                "lb": state.policy.lb,
                "breaker": state.breaker.state,
                "endpoints": endpoints,
            }
    return {"meshlib": __version__, "services": services}


def render(report: dict[str, Any]) -> str:
    """``status_report()`` as a terminal table: one block per service."""
    services: dict[str, Any] = report.get("services") or {}
    lines = _inbound(report.get("inbound"))
    if not services:
        lines.append("(this process has not called any mesh service yet)")
        return "\n".join(lines) + "\n"
    for name, service in services.items():
        endpoints = service.get("endpoints") or []
        ejected = sum(1 for e in endpoints if e.get("ejected_for_s") or not e.get("healthy", True))
        lines.append(
            f"{name}  breaker {service.get('breaker')}  lb {service.get('lb')}  "
            f"{len(endpoints) - ejected}/{len(endpoints)} usable"
        )
        lines.append(
            f"  {'ADDRESS':<24} {'VERSION':<10} {'WEIGHT':>6} {'IN FLIGHT':>9} "
            f"{'LATENCY':>10}  STATE"
        )
        for e in endpoints:
            latency = e.get("latency_ms")
            shown = f"{latency:.1f}ms" if isinstance(latency, int | float) else "-"
            state = f"ejected {e['ejected_for_s']:.1f}s" if e.get("ejected_for_s") else "ok"
            if not e.get("healthy", True):
                state = "failing checks" + ("" if state == "ok" else f", {state}")
            lines.append(
                f"  {e.get('address', ''):<24} {e.get('version') or '-':<10} "
                f"{e.get('weight', 1):>6} {e.get('in_flight', 0):>9} {shown:>10}  {state}"
            )
    return "\n".join(lines) + "\n"


def _inbound(inbound: Any) -> list[str]:
    """The inbound controls of a serving process: fault injection first, it is never normal."""
    if not isinstance(inbound, dict):
        return []
    lines = []
    if inbound.get("faults"):
        lines.append(f"FAULT INJECTION ON: {inbound['faults']} (from {inbound.get('faults_from')})")
    limits = [
        f"{name} {inbound[key]}"
        for name, key in (
            ("rate limit", "rate_limit"),
            ("per source", "rate_limit_per_source"),
            ("max concurrent", "max_concurrent_requests"),
        )
        if inbound.get(key)
    ]
    lines.append(
        f"inbound: {inbound.get('in_flight', 0)} in flight"
        + (f"; {', '.join(limits)}" if limits else "")
    )
    return [*lines, ""]
