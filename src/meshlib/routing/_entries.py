"""Consul config entries (their JSON shapes) compiled into routing chains.

The local config file holds the same ``service-router``, ``service-splitter``,
``service-resolver`` and ``service-defaults`` entries an operator would write to Consul,
so moving from the embedded default to Consul changes where the entries live, not what
they say. ``compile_entries`` checks them as Consul would (known kinds, splits summing to
100, subsets that exist, valid filters and durations) and raises ``ValueError`` naming the
entry and the field on the first problem, so a malformed file is refused whole and the last
good configuration stays in force.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from .._config import parse_duration
from ._chain import (
    RETRY_ON,
    Chain,
    Destination,
    HeaderMatch,
    QueryMatch,
    Resolver,
    Route,
    RouteMatch,
    Split,
)
from ._filter import compile_filter
from ._load_balancer import parse_load_balancer
from ._rewrite import RouteEdits, parse_header_edits

__all__ = ["compile_entries"]

KINDS = ("service-router", "service-splitter", "service-resolver", "service-defaults")


def compile_entries(entries: Sequence[Any]) -> dict[str, Chain]:
    """One ``Chain`` per service any entry names; ``ValueError`` on the first problem."""
    routers: dict[str, tuple[Route, ...]] = {}
    splits: dict[str, tuple[Split, ...]] = {}
    resolvers: dict[str, Resolver] = {}
    seen: set[tuple[str, str]] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"entry {index}: expected an object, not {type(entry).__name__}")
        kind, name = entry.get("Kind"), entry.get("Name")
        if kind not in KINDS:
            raise ValueError(f"entry {index}: Kind {kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"entry {index} ({kind}): Name must be a service name")
        where = f"{kind} {name!r}"
        if (kind, name) in seen:
            raise ValueError(f"{where}: defined twice")
        seen.add((kind, name))
        if kind == "service-router":
            routers[name] = tuple(
                _route(route, f"{where} Routes[{i}]")
                for i, route in enumerate(_list(entry, "Routes", where))
            )
        elif kind == "service-splitter":
            splits[name] = _splits(name, _list(entry, "Splits", where), where)
        elif kind == "service-resolver":
            resolvers[name] = _resolver(entry, where)
    for service, service_splits in splits.items():
        for split in service_splits:
            resolver = resolvers.get(split.service)
            if split.subset and (resolver is None or split.subset not in resolver.subsets):
                raise ValueError(
                    f"service-splitter {service!r}: subset {split.subset!r} of "
                    f"{split.service!r} is not defined by a service-resolver"
                )
    services = {name for _, name in seen}
    frozen_splits = MappingProxyType(splits)
    frozen_resolvers = MappingProxyType(resolvers)
    return {
        service: Chain(service, routers.get(service, ()), frozen_splits, frozen_resolvers)
        for service in services
    }


def _list(entry: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = entry.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where}: {key} must be a list")
    return value


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    """``value`` as an object; None counts as an empty one; anything else is refused."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected an object, not {type(value).__name__}")
    return value


def _text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, not {value!r}")
    return value


def _seconds(value: Any, where: str) -> float | None:
    if value in (None, "", 0):
        return None
    try:
        return parse_duration(str(value))
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a duration such as 500ms or 5s") from None


def _route(route: Any, where: str) -> Route:
    route = _obj(route, where)
    http = _obj(_obj(route.get("Match"), f"{where}.Match").get("HTTP"), f"{where}.Match.HTTP")
    header_items = [_obj(h, f"{where} Header") for h in _list(http, "Header", where)]
    query_items = [_obj(q, f"{where} QueryParam") for q in _list(http, "QueryParam", where)]
    headers = tuple(
        HeaderMatch(
            name=str(h.get("Name", "")),
            present=bool(h.get("Present", False)),
            exact=_text(h.get("Exact"), f"{where} Header.Exact"),
            prefix=_text(h.get("Prefix"), f"{where} Header.Prefix"),
            suffix=_text(h.get("Suffix"), f"{where} Header.Suffix"),
            regex=_text(h.get("Regex"), f"{where} Header.Regex"),
            invert=bool(h.get("Invert", False)),
        )
        for h in header_items
    )
    query = tuple(
        QueryMatch(
            name=str(q.get("Name", "")),
            present=bool(q.get("Present", False)),
            exact=_text(q.get("Exact"), f"{where} QueryParam.Exact"),
            regex=_text(q.get("Regex"), f"{where} QueryParam.Regex"),
        )
        for q in query_items
    )
    if any(not h.name for h in headers) or any(not q.name for q in query):
        raise ValueError(f"{where}: every Header and QueryParam match needs a Name")
    match = RouteMatch(
        path_exact=_text(http.get("PathExact"), f"{where} PathExact"),
        path_prefix=_text(http.get("PathPrefix"), f"{where} PathPrefix"),
        path_regex=_text(http.get("PathRegex"), f"{where} PathRegex"),
        methods=frozenset(str(m).upper() for m in _list(http, "Methods", where)),
        headers=headers,
        query=query,
    )
    destination = _obj(route.get("Destination"), f"{where}.Destination")
    codes = _list(destination, "RetryOnStatusCodes", where)
    if not all(isinstance(c, int) and 100 <= c <= 599 for c in codes):
        raise ValueError(f"{where}: RetryOnStatusCodes must be HTTP status codes")
    retries = destination.get("NumRetries")
    if retries is not None and not (isinstance(retries, int) and 0 <= retries <= 10):
        raise ValueError(f"{where}: NumRetries must be a whole number from 0 to 10")
    retry_on = _list(destination, "RetryOn", where)
    unknown = [c for c in retry_on if c not in RETRY_ON]
    if unknown:
        raise ValueError(f"{where}: RetryOn {unknown[0]!r} is not one of {', '.join(RETRY_ON)}")
    on_connect = destination.get("RetryOnConnectFailure")
    if on_connect is not None and not isinstance(on_connect, bool):
        raise ValueError(f"{where}: RetryOnConnectFailure must be true or false")
    conditions = frozenset(retry_on) | ({"connect-failure"} if on_connect else set())
    rewrite = _text(destination.get("PrefixRewrite"), f"{where} PrefixRewrite")
    matched = match.path_prefix if match.path_prefix is not None else match.path_exact
    if rewrite is not None and matched is None:
        raise ValueError(f"{where}: PrefixRewrite needs a PathPrefix or PathExact match")
    edits = RouteEdits(
        None if rewrite is None or matched is None else (matched, rewrite),
        parse_header_edits(destination.get("RequestHeaders"), f"{where} RequestHeaders"),
        parse_header_edits(destination.get("ResponseHeaders"), f"{where} ResponseHeaders"),
    )
    return Route(
        match,
        Destination(
            service=_text(destination.get("Service"), f"{where} Service") or "",
            subset=_text(destination.get("ServiceSubset"), f"{where} ServiceSubset") or "",
            request_timeout=_seconds(destination.get("RequestTimeout"), f"{where} RequestTimeout"),
            num_retries=retries,
            retry_on_status=frozenset(codes),
            edits=None if edits == RouteEdits() else edits,
            retry_on=conditions or None,
        ),
    )


def _splits(name: str, raw: list[Any], where: str) -> tuple[Split, ...]:
    result = []
    for i, split in enumerate(raw):
        weight = split.get("Weight") if isinstance(split, Mapping) else None
        if not isinstance(weight, int | float) or not 0 <= weight <= 100:
            raise ValueError(f"{where} Splits[{i}]: Weight must be a number from 0 to 100")
        service = _text(split.get("Service"), f"{where} Splits[{i}].Service") or name
        subset = _text(split.get("ServiceSubset"), f"{where} Splits[{i}].ServiceSubset") or ""
        edits = RouteEdits(
            None,
            parse_header_edits(split.get("RequestHeaders"), f"{where} Splits[{i}].RequestHeaders"),
            parse_header_edits(
                split.get("ResponseHeaders"), f"{where} Splits[{i}].ResponseHeaders"
            ),
        )
        result.append(
            Split(float(weight), service, subset, None if edits == RouteEdits() else edits)
        )
    total = sum(s.weight for s in result)
    if result and abs(total - 100) > 0.01:
        raise ValueError(f"{where}: the weights add up to {total:g}, not 100")
    return tuple(result)


def _resolver(entry: Mapping[str, Any], where: str) -> Resolver:
    subsets: dict[str, str] = {}
    only_passing: set[str] = set()
    for subset, body in _obj(entry.get("Subsets"), f"{where} Subsets").items():
        definition = _obj(body, f"{where} Subsets.{subset}")
        expression = str(definition.get("Filter") or "")
        passing = definition.get("OnlyPassing")
        if passing is not None and not isinstance(passing, bool):
            raise ValueError(f"{where} Subsets.{subset}: OnlyPassing must be true or false")
        if passing:
            only_passing.add(str(subset))
        if expression:
            try:
                compile_filter(expression)
            except ValueError as exc:
                raise ValueError(f"{where} Subsets.{subset}: {exc}") from None
        subsets[str(subset)] = expression
    default = _text(entry.get("DefaultSubset"), f"{where} DefaultSubset") or ""
    if default and default not in subsets:
        raise ValueError(f"{where}: DefaultSubset {default!r} is not one of its Subsets")
    redirect = _obj(entry.get("Redirect"), f"{where} Redirect")
    datacenters: dict[str, tuple[str, ...]] = {}
    services: dict[str, tuple[str, ...]] = {}
    for subset, raw in _obj(entry.get("Failover"), f"{where} Failover").items():
        failover = _obj(raw, f"{where} Failover.{subset}")
        if failover.get("Datacenters"):
            datacenters[subset] = tuple(
                str(dc) for dc in _list(failover, "Datacenters", f"{where} Failover.{subset}")
            )
        if failover.get("Service"):
            services[subset] = (str(failover["Service"]),)
        for raw_target in _list(failover, "Targets", f"{where} Failover.{subset}"):
            target = _obj(raw_target, f"{where} Failover.{subset}.Targets")
            if target.get("Datacenter"):
                datacenters[subset] = (*datacenters.get(subset, ()), str(target["Datacenter"]))
            if target.get("Service"):
                services[subset] = (*services.get(subset, ()), str(target["Service"]))
    return Resolver(
        subsets=MappingProxyType(subsets),
        only_passing=frozenset(only_passing),
        default_subset=default,
        redirect_service=str(redirect.get("Service", "")),
        redirect_subset=str(redirect.get("ServiceSubset", "")),
        redirect_datacenter=str(redirect.get("Datacenter", "")),
        failover_datacenters=MappingProxyType(datacenters),
        failover_services=MappingProxyType(services),
        connect_timeout=_seconds(entry.get("ConnectTimeout"), f"{where} ConnectTimeout"),
        load_balancer=parse_load_balancer(entry.get("LoadBalancer"), f"{where} LoadBalancer"),
    )
