"""Consul's compiled discovery chain (``/v1/discovery-chain/<service>``) as a router.

Consul compiles a service's ``service-router``, ``service-splitter`` and
``service-resolver`` entries into a graph (``structs.CompiledDiscoveryChain``): ``Nodes``
of ``Type`` ``router`` (``Routes``: ``Definition.Match`` / ``Definition.Destination`` and a
``NextNode``), ``splitter`` (``Splits``: ``Weight`` and a ``NextNode``) and ``resolver``
(``Resolver.Target`` and ``Resolver.Failover.Targets``), starting at ``StartNode``; and
``Targets`` by ID (``Service``, ``ServiceSubset``, ``Subset.Filter`` and
``Subset.OnlyPassing``, ``Datacenter``, ``ConnectTimeout``). This is what Envoy sidecars
are configured from, so following the graph as compiled -- rather than re-compiling the
entries ourselves -- routes exactly as they do (redirects, nested splits and defaults are
already resolved by Consul).

``compile_chain`` turns the JSON into a ``CompiledChain`` with the same ``decide`` as the
local file's ``Chain``, or ``None`` for a chain that routes nowhere but to the service
itself (Consul's default chain): such a service is routed exactly as without any chain.
A malformed answer raises ``ValueError`` naming the field; the caller keeps the last good
chain.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._chain import Decision, Destination, RouteMatch, Target
from ._entries import _route, _seconds
from ._load_balancer import parse_load_balancer
from ._rewrite import RouteEdits, parse_header_edits
from ._sticky import key_point

__all__ = ["CompiledChain", "compile_chain"]


@dataclass(frozen=True, slots=True)
class _Resolver:
    target: Target


@dataclass(frozen=True, slots=True)
class _Splitter:
    #: (cumulative weight, next node, the split's header edits); the last cumulative
    #: weight is the total
    splits: tuple[tuple[float, _Node, RouteEdits | None], ...]
    #: the service whose splitter this is (salts sticky keys, routing/_sticky.py)
    service: str = ""


@dataclass(frozen=True, slots=True)
class _Router:
    routes: tuple[tuple[RouteMatch, Destination, _Node], ...]


_Node = _Resolver | _Splitter | _Router


@dataclass(frozen=True)
class CompiledChain:
    """A service's compiled discovery chain, ready to route requests (immutable)."""

    service: str
    start: _Node

    def targets(self) -> list[Target]:
        """Every target the chain may send to, failover targets included."""
        found: list[Target] = []
        todo: list[_Node] = [self.start]
        while todo:
            node = todo.pop()
            if isinstance(node, _Resolver):
                found += [node.target, *node.target.failover]
            elif isinstance(node, _Splitter):
                todo += [n for _, n, _ in node.splits]
            else:
                todo += [n for _, _, n in node.routes]
        return found

    def decide(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        rng: random.Random | None = None,
        sticky_key: str | None = None,
    ) -> Decision:
        """Route, split and resolve one request by walking the graph from its start.

        With a ``sticky_key`` a splitter picks by the key's hash (routing/_sticky.py), so
        one key always takes one split; without, at random.
        """
        node = self.start
        destination: Destination | None = None
        split_edits: RouteEdits | None = None
        while True:
            if isinstance(node, _Resolver):
                if destination is None:
                    return Decision(node.target, split_edits=split_edits)
                return Decision(
                    node.target,
                    destination.request_timeout,
                    destination.num_retries,
                    destination.retry_on_status,
                    edits=destination.edits,
                    retry_on=destination.retry_on,
                    split_edits=split_edits,
                )
            if isinstance(node, _Splitter):
                total = node.splits[-1][0]
                if sticky_key is None:
                    pick = (rng or random).uniform(0, total)
                else:
                    pick = key_point(node.service, sticky_key) / 100 * total
                chosen = next((s for s in node.splits if pick < s[0]), node.splits[-1])
                node, split_edits = chosen[1], chosen[2]
                continue
            router = node
            # Consul always ends a router with a catch-all route; fall back to it anyway.
            _, destination, node = router.routes[-1]
            for match, route_destination, next_node in router.routes:
                if match.fits(method, path, headers, query):
                    destination, node = route_destination, next_node
                    break


def compile_chain(body: Any) -> CompiledChain | None:
    """The chain in a ``/v1/discovery-chain`` answer; ``None`` for a default chain."""
    chain = _obj(_obj(body, "the answer").get("Chain"), "Chain")
    service = chain.get("ServiceName")
    if not isinstance(service, str) or not service:
        raise ValueError("Chain.ServiceName is not a service name")
    local_dc = chain.get("Datacenter")
    if not isinstance(local_dc, str):
        raise ValueError("Chain.Datacenter is not a string")
    nodes = _obj(chain.get("Nodes"), "Chain.Nodes")
    raw_targets = _obj(chain.get("Targets"), "Chain.Targets")
    plain = {tid: _target(tid, raw, local_dc) for tid, raw in raw_targets.items()}
    built: dict[str, _Node] = {}

    def build(name: Any, where: str, visiting: frozenset[str]) -> _Node:
        if not isinstance(name, str) or name not in nodes:
            raise ValueError(f"{where}: {name!r} is not one of Chain.Nodes")
        if name in visiting:
            raise ValueError(f"{where}: {name!r} leads back to itself")
        if name in built:
            return built[name]
        raw = _obj(nodes[name], f"Nodes[{name!r}]")
        inner = visiting | {name}
        kind = raw.get("Type")
        node: _Node
        if kind == "resolver":
            node = _resolver(name, raw, plain)
        elif kind == "splitter":
            splits: list[tuple[float, _Node, RouteEdits | None]] = []
            total = 0.0
            for i, split in enumerate(_list(raw.get("Splits"), f"Nodes[{name!r}].Splits")):
                split = _obj(split, f"Nodes[{name!r}].Splits[{i}]")
                weight = split.get("Weight") or 0  # Consul omits a weight of 0
                if not isinstance(weight, int | float) or not 0 <= weight <= 100:
                    raise ValueError(f"Nodes[{name!r}].Splits[{i}].Weight: {weight!r}")
                next_node = build(split.get("NextNode"), f"{name} split {i}", inner)
                split_def = _obj(split.get("Definition"), f"Nodes[{name!r}].Splits[{i}]")
                edits = RouteEdits(
                    None,
                    parse_header_edits(split_def.get("RequestHeaders"), "RequestHeaders"),
                    parse_header_edits(split_def.get("ResponseHeaders"), "ResponseHeaders"),
                )
                if weight:  # a share of 0 is never chosen, not even by rounding
                    total += float(weight)
                    splits.append((total, next_node, None if edits == RouteEdits() else edits))
            if not splits or total <= 0:
                raise ValueError(f"Nodes[{name!r}]: a splitter without weights")
            # Consul names a splitter node "splitter:<service>.<namespace>.<partition>.<dc>"
            owner = name.removeprefix("splitter:").split(".", 1)[0]
            node = _Splitter(tuple(splits), owner)
        elif kind == "router":
            routes = []
            for i, route in enumerate(_list(raw.get("Routes"), f"Nodes[{name!r}].Routes")):
                where_route = f"Nodes[{name!r}].Routes[{i}]"
                route = _obj(route, where_route)
                definition = _route(route.get("Definition"), f"{where_route}.Definition")
                next_node = build(route.get("NextNode"), where_route, inner)
                routes.append((definition.match, definition.destination, next_node))
            if not routes:
                raise ValueError(f"Nodes[{name!r}]: a router without routes")
            node = _Router(tuple(routes))
        else:
            raise ValueError(f"Nodes[{name!r}].Type {kind!r} is not router/splitter/resolver")
        built[name] = node
        return node

    start = build(chain.get("StartNode"), "Chain.StartNode", frozenset())
    if isinstance(start, _Resolver) and start.target == Target(
        service, connect_timeout=start.target.connect_timeout
    ):
        return None  # Consul's default chain: the service itself, nothing to decide
    return CompiledChain(service, start)


def _resolver(name: str, raw: Mapping[str, Any], targets: Mapping[str, Target]) -> _Resolver:
    balancer = parse_load_balancer(raw.get("LoadBalancer"), f"Nodes[{name!r}].LoadBalancer")
    where = f"Nodes[{name!r}].Resolver"
    resolver = _obj(raw.get("Resolver"), where)
    primary = _known(resolver.get("Target"), f"{where}.Target", targets)
    failover = _obj(resolver.get("Failover"), f"{where}.Failover")
    others = tuple(
        _known(tid, f"{where}.Failover.Targets", targets)
        for tid in _list(failover.get("Targets"), f"{where}.Failover.Targets")
    )
    return _Resolver(
        Target(
            primary.service,
            primary.subset,
            primary.filter,
            primary.datacenter,
            primary.connect_timeout,
            others,
            balancer,
            primary.only_passing,
        )
    )


def _target(tid: str, raw: Any, local_dc: str) -> Target:
    where = f"Targets[{tid!r}]"
    target = _obj(raw, where)
    service = target.get("Service")
    if not isinstance(service, str) or not service:
        raise ValueError(f"{where}.Service is not a service name")
    subset = target.get("ServiceSubset") or ""
    datacenter = target.get("Datacenter") or ""
    definition = _obj(target.get("Subset"), f"{where}.Subset")
    expression = definition.get("Filter") or ""
    if not all(isinstance(v, str) for v in (subset, datacenter, expression)):
        raise ValueError(f"{where}: ServiceSubset, Datacenter and Subset.Filter must be text")
    only_passing = definition.get("OnlyPassing") or False
    if not isinstance(only_passing, bool):
        raise ValueError(f"{where}.Subset.OnlyPassing is not true or false")
    return Target(
        service,
        subset,
        expression,
        "" if datacenter == local_dc else datacenter,  # "" = the local datacenter
        _seconds(target.get("ConnectTimeout"), f"{where}.ConnectTimeout"),
        only_passing=only_passing,
    )


def _known(tid: Any, where: str, targets: Mapping[str, Target]) -> Target:
    if not isinstance(tid, str) or tid not in targets:
        raise ValueError(f"{where}: {tid!r} is not one of Chain.Targets")
    return targets[tid]


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} is not a JSON object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where} is not a JSON list")
    return value
