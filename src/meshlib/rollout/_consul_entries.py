"""The routing a rollout changes, written as Consul's own config entries.

The ``service-resolver`` with the subsets is the operator's: the controller only reads it
(to check the canary subset exists and to learn which version it selects). The controller
owns the ``service-splitter`` (stable/canary weights) and, in A/B mode (or blue/green with a
test-traffic match), one route of the ``service-router``: a header or cookie match sent to
the canary. Every write is a check-and-set on the entry's ``ModifyIndex``, so a change
someone made meanwhile is re-read and kept rather than clobbered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ._consul import ConsulAPI, RolloutError

__all__ = [
    "MANAGED_BY",
    "Match",
    "Resolver",
    "instances",
    "read_resolver",
    "read_split",
    "remove_route",
    "write_route",
    "write_split",
]

#: ``Meta`` of the entries the controller created, so cleanup deletes only its own.
MANAGED_BY = {"managed-by": "meshlib-rollout"}
_CAS_ATTEMPTS = 10
_SERVER_FIELDS = frozenset({"Hash", "CreateIndex", "ModifyIndex"})
_VERSION_CLAUSE = re.compile(r"""Service\.Meta\.version\s*==\s*["']?([A-Za-z0-9._-]+)["']?""")


@dataclass(frozen=True)
class Resolver:
    """What the controller needs from the operator's ``service-resolver``."""

    service: str
    subsets: Mapping[str, str]
    default: str

    def version(self, subset: str) -> str:
        """The ``Service.Meta.version`` a subset selects (its name when the filter says none).

        meshlib labels its metrics with the instance's version, so this is how the canary's
        requests are found in Prometheus.
        """
        found = _VERSION_CLAUSE.search(self.subsets.get(subset, ""))
        return found.group(1) if found else subset


@dataclass(frozen=True)
class Match:
    """A request match that routes to the canary: a header, or a cookie, equal to a value."""

    kind: str  # "header" or "cookie"
    name: str
    value: str

    def consul(self) -> dict[str, Any]:
        """The route's ``Match`` as Consul writes it (a cookie is a regex on ``cookie``)."""
        if self.kind == "header":
            header = {"Name": self.name, "Exact": self.value}
        else:
            # Consul's router has no cookie match; Envoy users match the Cookie header too.
            name, value = re.escape(self.name), re.escape(self.value)
            header = {"Name": "cookie", "Regex": f"(^|.*;\\s*){name}={value}(;.*|$)"}
        return {"HTTP": {"Header": [header]}}

    def __str__(self) -> str:
        return f"{self.kind} {self.name}={self.value}"


def _entry(api: ConsulAPI, kind: str, service: str) -> dict[str, Any] | None:
    body, _ = api.call("GET", f"/v1/config/{kind}/{quote(service, safe='')}", missing_ok=True)
    return body if isinstance(body, dict) else None


def read_resolver(api: ConsulAPI, service: str) -> Resolver:
    """The operator's resolver for ``service``, or ``RolloutError`` saying what is missing."""
    entry = _entry(api, "service-resolver", service)
    if entry is None:
        raise RolloutError(
            f"no service-resolver {service!r} in Consul at {api.address}: write one whose "
            "Subsets select the stable and the canary version (docs/rollouts.md)"
        )
    subsets = {
        str(name): str((body or {}).get("Filter") or "")
        for name, body in (entry.get("Subsets") or {}).items()
    }
    return Resolver(service, subsets, str(entry.get("DefaultSubset") or ""))


def instances(api: ConsulAPI, resolver: Resolver, subset: str) -> list[str]:
    """Where Prometheus scrapes each instance ``subset`` selects, healthy or not: ``host:port``.

    The subset's ``Filter`` is the same expression Consul's health endpoint filters with, so
    these are the instances a client following the discovery chain reaches. A meshlib server
    serves its metrics on its admin listener, whose port it registers as ``Meta.admin-port``
    (server/_registration.py); an instance without one is scraped on its service port.
    """
    params = {"filter": resolver.subsets[subset]} if resolver.subsets.get(subset) else {}
    path = f"/v1/health/service/{quote(resolver.service, safe='')}"
    body, _ = api.call("GET", path, params=params)
    found = []
    for entry in body or ():
        service = entry.get("Service") or {}
        host = service.get("Address") or (entry.get("Node") or {}).get("Address") or ""
        port = (service.get("Meta") or {}).get("admin-port") or service.get("Port")
        found.append(f"{host}:{port}")
    return sorted(found)


def read_split(api: ConsulAPI, service: str) -> dict[str, int] | None:
    """The current splitter's weight per subset of ``service``, or None without a splitter."""
    entry = _entry(api, "service-splitter", service)
    if entry is None:
        return None
    weights: dict[str, int] = {}
    for split in entry.get("Splits") or ():
        if split.get("Service", service) in ("", service):
            subset = str(split.get("ServiceSubset") or "")
            weights[subset] = weights.get(subset, 0) + round(float(split.get("Weight", 0)))
    return weights


def _put(api: ConsulAPI, entry: dict[str, Any], cas: int) -> bool:
    ok, _ = api.call("PUT", "/v1/config", params={"cas": str(cas)}, body=entry)
    return ok is True


def write_split(api: ConsulAPI, service: str, stable: str, canary: str, weight: int) -> None:
    """Send ``weight`` percent of ``service`` to ``canary`` and the rest to ``stable``."""
    entry = {
        "Kind": "service-splitter",
        "Name": service,
        "Meta": MANAGED_BY,
        "Splits": [
            {"Weight": 100 - weight, "ServiceSubset": stable},
            {"Weight": weight, "ServiceSubset": canary},
        ],
    }
    for _ in range(_CAS_ATTEMPTS):
        current = _entry(api, "service-splitter", service)
        if _put(api, entry, int(current["ModifyIndex"]) if current else 0):
            return
    raise RolloutError(f"service-splitter {service!r} keeps changing under the controller")


def write_route(api: ConsulAPI, service: str, canary: str, match: Match) -> None:
    """Put a route ``match`` -> ``canary`` first in the service-router, keeping other routes."""
    route = {"Match": match.consul(), "Destination": {"ServiceSubset": canary}}
    for _ in range(_CAS_ATTEMPTS):
        current = _entry(api, "service-router", service)
        others = [
            r for r in (current or {}).get("Routes") or () if r.get("Match") != route["Match"]
        ]
        entry = {
            "Kind": "service-router",
            "Name": service,
            "Meta": (current or {}).get("Meta") or MANAGED_BY,
            "Routes": [route, *others],
        }
        if _put(api, entry, int(current["ModifyIndex"]) if current else 0):
            return
    raise RolloutError(f"service-router {service!r} keeps changing under the controller")


def remove_route(api: ConsulAPI, service: str, match: Match) -> None:
    """Take the canary route out again; delete the router if the controller made it."""
    path = f"/v1/config/service-router/{quote(service, safe='')}"
    for _ in range(_CAS_ATTEMPTS):
        current = _entry(api, "service-router", service)
        if current is None:
            return
        routes = [r for r in current.get("Routes") or () if r.get("Match") != match.consul()]
        cas = str(current["ModifyIndex"])
        if not routes and current.get("Meta") == MANAGED_BY:
            ok, _ = api.call("DELETE", path, params={"cas": cas})
        else:
            kept = {k: v for k, v in current.items() if k not in _SERVER_FIELDS}
            ok = _put(api, {**kept, "Routes": routes}, int(cas))
        if ok is True:
            return
    raise RolloutError(f"service-router {service!r} keeps changing under the controller")
