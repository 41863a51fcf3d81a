"""Consul's answers about instances: health entries, and the datacenter's node dump.

``endpoints`` reads entries shaped as ``/v1/health/service/<name>`` answers them.
``group_dump`` turns one ``/v1/internal/ui/nodes`` answer (every node with its services
and checks: the whole datacenter in one blocking query) into such entries per service, as
Consul would answer ``/v1/health/service/<name>`` (or ``/v1/health/connect/<name>``) for
each: an instance's checks are its node's checks and its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .._endpoint import Endpoint
from ..consul import BadAnswer

__all__ = ["endpoints", "fingerprint", "group_dump"]

#: the largest weight Consul gives Envoy (``calculateEndpointHealthAndWeight``)
MAX_WEIGHT = 128


def group_dump(body: Any, *, connect: bool) -> tuple[frozenset[str], dict[str, list[Any]]]:
    """(every service name in the catalog, health entries per service) from a node dump.

    With ``connect`` the entries are those ``/v1/health/connect/<name>`` answers: sidecar
    proxies (``Kind`` ``connect-proxy``) under their destination service, and natively
    Connect-capable instances under their own. Peered services are not this datacenter's.
    BadAnswer if the dump is malformed.
    """
    if not isinstance(body, list):
        raise BadAnswer("the node dump is not a JSON list")
    names: set[str] = set()
    grouped: dict[str, list[Any]] = {}
    for node in body:
        if not isinstance(node, dict):
            raise BadAnswer("a node in the dump is not a JSON object")
        services, checks = node.get("Services") or [], node.get("Checks") or []
        if not isinstance(services, list) or not isinstance(checks, list):
            raise BadAnswer("a node's Services or Checks is not a list")
        node_checks: list[Any] = []
        own_checks: dict[str, list[Any]] = {}
        for check in checks:
            if not isinstance(check, dict):
                raise BadAnswer("a check in the dump is not a JSON object")
            service_id = check.get("ServiceID") or ""
            (own_checks.setdefault(service_id, []) if service_id else node_checks).append(check)
        where = {"Node": node.get("Node"), "Address": node.get("Address")}
        for service in services:
            if not isinstance(service, dict):
                raise BadAnswer("a service in the dump is not a JSON object")
            name = service.get("Service")
            if not isinstance(name, str) or service.get("PeerName"):
                continue
            names.add(name)
            if connect:
                kind = service.get("Kind") or ""
                if kind == "connect-proxy":
                    proxy = service.get("Proxy")
                    name = proxy.get("DestinationServiceName") if isinstance(proxy, dict) else None
                    if not isinstance(name, str):
                        continue
                elif kind or not _native(service):
                    continue
            entry_checks = node_checks + own_checks.get(str(service.get("ID") or ""), [])
            grouped.setdefault(name, []).append(
                {"Node": where, "Service": service, "Checks": entry_checks}
            )
    return frozenset(names), grouped


def _native(service: dict[str, Any]) -> bool:
    connect = service.get("Connect")
    return isinstance(connect, dict) and connect.get("Native") is True


def endpoints(body: Any) -> tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]:
    """The (healthy, unhealthy) endpoints in a ``/v1/health/service`` answer, each sorted.

    Health and weight as Consul computes them for Envoy (``calculateEndpointHealthAndWeight``
    in its agent/xds/endpoints.go), for a target without ``OnlyPassing``:

    * a critical check of the instance or its node (maintenance is one) makes it unhealthy;
    * a warning check, none critical, leaves it healthy, marked ``Endpoint.warning``, at
      ``Weights.Warning`` instead of ``Weights.Passing`` (a subset with ``OnlyPassing``
      counts it unhealthy: ``Snapshot.only_passing``);
    * a weight below 1 (``Weights.Warning`` may be 0) makes it unhealthy, at weight 1;
      a weight above 128 is 128, Envoy's largest as Consul configures it.

    BadAnswer if the answer is malformed.
    """
    if not isinstance(body, list):
        raise BadAnswer("the health answer is not a JSON list")
    healthy: list[Endpoint] = []
    unhealthy: list[Endpoint] = []
    for entry in body:
        if not isinstance(entry, dict):
            raise BadAnswer("a health entry is not a JSON object")
        service, node = entry.get("Service"), entry.get("Node")
        if not isinstance(service, dict) or not isinstance(node, dict):
            raise BadAnswer("a health entry lacks its Service or Node object")
        port = _int(service.get("Port"))
        if port is None or not 0 <= port < 65536:
            raise BadAnswer(f"Service.Port {service.get('Port')!r} is not a port number")
        if port == 0:
            continue  # registered without a port (a socket path, say): nothing to dial
        host = service.get("Address") or node.get("Address")
        if not isinstance(host, str) or not host:
            raise BadAnswer("a health entry has neither Service.Address nor Node.Address")
        statuses = _statuses(entry.get("Checks"))
        warns = "warning" in statuses
        critical = not statuses <= {"passing", "warning"}
        weight = _weight(service.get("Weights"), warns)
        (unhealthy if critical or weight < 1 else healthy).append(
            Endpoint(
                host=host,
                port=port,
                weight=min(max(weight, 1), MAX_WEIGHT),
                id=_text(service.get("ID"), "Service.ID"),
                node=_text(node.get("Node"), "Node.Node"),
                meta=_meta(service.get("Meta")),
                tags=_tags(service.get("Tags")),
                warning=warns and not critical,
            )
        )
    healthy.sort(key=_order)
    unhealthy.sort(key=_order)
    return tuple(healthy), tuple(unhealthy)


def _order(endpoint: Endpoint) -> tuple[str, str, str, int]:
    return endpoint.node, endpoint.id, endpoint.host, endpoint.port


def _statuses(checks: object) -> set[str]:
    """The statuses of a health entry's ``Checks`` (none: it passes).

    Consul's are passing, warning and critical (a maintenance check is critical); any
    other counts as critical where it matters.
    """
    if checks is None:
        return set()
    if not isinstance(checks, list) or not all(isinstance(c, dict) for c in checks):
        raise BadAnswer("Checks is not a list of objects")
    return {status if isinstance(status := c.get("Status"), str) else "" for c in checks}


def _weight(weights: object, warns: bool) -> int:
    """``Weights.Warning`` for an instance with a warning check, else ``Weights.Passing``.

    Without ``Weights`` (or the field), 1: Consul's default for both.
    """
    if not isinstance(weights, dict):
        return 1
    weight = _int(weights.get("Warning" if warns else "Passing"))
    return 1 if weight is None else weight


def fingerprint(healthy: tuple[Endpoint, ...], unhealthy: tuple[Endpoint, ...]) -> object:
    """What makes two answers different news (a check's output alone is not)."""
    # Endpoint's own equality ignores meta and tags; a change in either is still news.
    return tuple(
        tuple(
            (
                e.host,
                e.port,
                e.weight,
                e.id,
                e.node,
                tuple(sorted(e.meta.items())),
                e.tags,
                e.warning,
            )
            for e in endpoints
        )
        for endpoints in (healthy, unhealthy)
    )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: object, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadAnswer(f"{field} {value!r} is not a string")
    return value


def _meta(value: object) -> Mapping[str, str]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadAnswer("Service.Meta is not an object of strings")
    return MappingProxyType(dict(value))


def _tags(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
        raise BadAnswer("Service.Tags is not a list of strings")
    return tuple(value)
