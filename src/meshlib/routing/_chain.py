"""The compiled routing of one service: router, then splitter, then resolver.

This is the shape of Consul's discovery chain (``/v1/discovery-chain/<service>``), which
compiles a service's ``service-router``, ``service-splitter`` and ``service-resolver``
entries into one graph; the same config entries from the local config file compile into
the same ``Chain`` (_entries.py), so both sources route identically. Per request:

1. **router**: the first route whose match (path exact/prefix/regex, methods, headers,
   query parameters) fits the request picks a destination: a service, optionally a subset,
   and the route's request timeout, retry count and retry-on status codes;
2. **splitter**: without a subset, the destination service's splits choose one by weight
   (canary, blue/green);
3. **resolver**: the subset (or the resolver's default subset) becomes a filter on the
   service's instances (and, with the subset's ``OnlyPassing``, leaves out those whose
   checks warn); a redirect sends to another service; failover lists where to go
   when the target has no healthy instance.

A ``Chain`` is immutable; new configuration is a new ``Chain`` (a pointer swap).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._load_balancer import LoadBalancer
from ._rewrite import RouteEdits
from ._sticky import key_point

__all__ = [
    "Chain",
    "Decision",
    "Destination",
    "HeaderMatch",
    "QueryMatch",
    "Resolver",
    "Route",
    "RouteMatch",
    "Split",
    "Target",
]

_EMPTY: Mapping[str, str] = MappingProxyType({})

#: The ``RetryOn`` conditions Consul accepts (Envoy's ``retry_on``)
RETRY_ON = (
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)


@dataclass(frozen=True, slots=True)
class Target:
    """Instances of one service (or one subset of it) in one datacenter."""

    service: str
    subset: str = ""
    #: Consul filter expression selecting the subset ("" = every instance)
    filter: str = ""
    #: "" = the local datacenter
    datacenter: str = ""
    connect_timeout: float | None = None
    #: where to go, in order, when this target has no healthy instance
    failover: tuple[Target, ...] = ()
    #: the resolver's LoadBalancer (None: meshlib's own MESH_LB)
    load_balancer: LoadBalancer | None = None
    #: the subset's ``OnlyPassing``: instances whose checks warn count as unhealthy
    #: (``Snapshot.only_passing``); without it (and without a subset) they are healthy
    only_passing: bool = False

    @property
    def key(self) -> str:
        """Consul's target ID form: ``subset.service.datacenter`` (empty parts kept)."""
        return f"{self.subset}.{self.service}.{self.datacenter}"


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One header condition of a route (Consul's ServiceRouteHTTPMatchHeader)."""

    name: str
    present: bool = False
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    regex: str | None = None
    invert: bool = False

    def fits(self, headers: Mapping[str, str]) -> bool:
        """Whether ``headers`` (lower-cased names) satisfy this condition."""
        value = headers.get(self.name.lower())
        if self.exact is not None:
            ok = value == self.exact
        elif self.prefix is not None:
            ok = value is not None and value.startswith(self.prefix)
        elif self.suffix is not None:
            ok = value is not None and value.endswith(self.suffix)
        elif self.regex is not None:
            ok = value is not None and re.fullmatch(self.regex, value) is not None
        else:  # "present", the default condition
            ok = value is not None
        return ok != self.invert


@dataclass(frozen=True, slots=True)
class QueryMatch:
    """One query-parameter condition of a route."""

    name: str
    present: bool = False
    exact: str | None = None
    regex: str | None = None

    def fits(self, query: Mapping[str, str]) -> bool:
        """Whether the query parameters satisfy this condition."""
        value = query.get(self.name)
        if self.exact is not None:
            return value == self.exact
        if self.regex is not None:
            return value is not None and re.fullmatch(self.regex, value) is not None
        return value is not None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """What a request must look like for a route to apply (all conditions hold)."""

    path_exact: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: frozenset[str] = frozenset()
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()

    def fits(
        self, method: str, path: str, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> bool:
        """Whether the request matches."""
        if self.path_exact is not None and path != self.path_exact:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.path_regex is not None and re.fullmatch(self.path_regex, path) is None:
            return False
        if self.methods and method.upper() not in self.methods:
            return False
        return all(h.fits(headers) for h in self.headers) and all(q.fits(query) for q in self.query)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a route sends, and the route's own timeout and retry settings."""

    service: str = ""  # "" = the chain's own service
    subset: str = ""
    request_timeout: float | None = None
    num_retries: int | None = None
    retry_on_status: frozenset[int] = frozenset()
    #: PrefixRewrite, RequestHeaders, ResponseHeaders (None: no edits)
    edits: RouteEdits | None = None
    #: RetryOn conditions, with "connect-failure" for RetryOnConnectFailure (None: unset)
    retry_on: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """One router rule."""

    match: RouteMatch
    destination: Destination


@dataclass(frozen=True, slots=True)
class Split:
    """One share of a splitter: ``weight`` percent to a service (and subset)."""

    weight: float
    service: str
    subset: str = ""
    #: the split's RequestHeaders / ResponseHeaders (None: no edits)
    edits: RouteEdits | None = None


@dataclass(frozen=True, slots=True)
class Resolver:
    """A service's subsets, default subset, redirect and failover."""

    subsets: Mapping[str, str] = field(default_factory=lambda: _EMPTY)  # name -> filter
    default_subset: str = ""
    redirect_service: str = ""
    redirect_subset: str = ""
    redirect_datacenter: str = ""
    #: subset name ("*" for any) -> datacenters to fail over to, in order
    failover_datacenters: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    #: subset name ("*" for any) -> services to fail over to, in order
    failover_services: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    connect_timeout: float | None = None
    load_balancer: LoadBalancer | None = None
    #: the subsets whose ``OnlyPassing`` is true
    only_passing: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    """What the chain decided for one request."""

    target: Target
    request_timeout: float | None = None
    num_retries: int | None = None
    retry_on_status: frozenset[int] = frozenset()
    #: the key of the resolver's HashPolicies (routing/_load_balancer.py), if any
    hash_key: str | None = None
    #: the route's path and header edits (routing/_rewrite.py)
    edits: RouteEdits | None = None
    #: the route's retry conditions (None: meshlib's own, see resilience/_retry.py)
    retry_on: frozenset[str] | None = None
    #: the chosen split's header edits, applied before the route's (Envoy's order)
    split_edits: RouteEdits | None = None


@dataclass(frozen=True)
class Chain:
    """A service's compiled routing."""

    service: str
    routes: tuple[Route, ...] = ()
    splits: Mapping[str, tuple[Split, ...]] = field(default_factory=lambda: MappingProxyType({}))
    resolvers: Mapping[str, Resolver] = field(default_factory=lambda: MappingProxyType({}))

    def decide(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        rng: random.Random | None = None,
        sticky_key: str | None = None,
    ) -> Decision:
        """Route, split and resolve one request.

        With a ``sticky_key`` a split is picked by the key's hash (routing/_sticky.py), so
        one key always takes one split; without, at random.
        """
        destination = Destination()
        for route in self.routes:
            if route.match.fits(method, path, headers, query):
                destination = route.destination
                break
        service = destination.service or self.service
        subset = destination.subset
        split_edits = None
        if not subset:
            service, subset, split_edits = self._split(service, rng or random, sticky_key)
        return Decision(
            self.target(service, subset),
            destination.request_timeout,
            destination.num_retries,
            destination.retry_on_status,
            edits=destination.edits,
            retry_on=destination.retry_on,
            split_edits=split_edits,
        )

    def _split(
        self, service: str, rng: Any, sticky_key: str | None
    ) -> tuple[str, str, RouteEdits | None]:
        """Follow splitters from ``service`` (``rng``: random.Random or the module)."""
        for _ in range(8):  # a splitter may send to another service's splitter; no cycles
            splits = self.splits.get(service)
            if not splits:
                return service, "", None
            # weights add up to 100 (Consul's rule, checked in _entries.py)
            pick = rng.uniform(0, 100) if sticky_key is None else key_point(service, sticky_key)
            chosen = splits[-1]
            for split in splits:
                pick -= split.weight
                if pick < 0:
                    chosen = split
                    break
            if chosen.subset or chosen.service == service:
                return chosen.service, chosen.subset, chosen.edits
            service = chosen.service
        return service, "", None

    def target(self, service: str, subset: str = "", datacenter: str = "") -> Target:
        """The target for ``service``/``subset``, after the resolver's redirect and default."""
        resolver = self.resolvers.get(service)
        if resolver is None:
            return Target(service, subset, "", datacenter)
        if resolver.redirect_service or resolver.redirect_datacenter:
            return self.target(
                resolver.redirect_service or service,
                resolver.redirect_subset,
                resolver.redirect_datacenter or datacenter,
            )
        subset = subset or resolver.default_subset
        only_passing = subset in resolver.only_passing
        failover = tuple(
            Target(service, subset, resolver.subsets.get(subset, ""), dc, only_passing=only_passing)
            for dc in _for_subset(resolver.failover_datacenters, subset)
        ) + tuple(self.target(other) for other in _for_subset(resolver.failover_services, subset))
        return Target(
            service,
            subset,
            resolver.subsets.get(subset, ""),
            datacenter,
            resolver.connect_timeout,
            failover,
            resolver.load_balancer,
            only_passing,
        )


def _for_subset(table: Mapping[str, tuple[str, ...]], subset: str) -> tuple[str, ...]:
    return table.get(subset) or table.get("*") or ()
