"""The mesh of a process: the one owner of everything a configuration sets going.

A ``Mesh`` owns its discovery, its ``Security`` (TLS contexts, egress policy, authorizer),
its server ``Instance`` (made when a middleware or ``meshlib serve`` first asks), and the
state of every service it calls; closing it closes them. The telemetry gauges over those
parts are registered here, by their owner, as callbacks over the open meshes.

Clients and servers built from the same configuration share one mesh (``Mesh.for_config``),
so a process has one set of discovery watches (one background thread), one view of which
endpoints are ejected, one retry budget and breaker per destination service, and one
instance in Consul's catalog -- as a sidecar would -- however many clients and middlewares
it creates. A mesh made directly (``Mesh(config)``) is its maker's own, shared by nobody.

``lookup`` classifies a request's host:

* a service discovery knows (or ``<name>.service.consul``) -> its ``ServiceState``;
* an IP literal, ``localhost``, or any other dotted name -> ``None`` (not the mesh's:
  the request passes through untouched);
* a single-label name discovery has not answered for yet -> ``Pending``: the caller waits
  once, bounded by ``MESH_DISCOVERY_TIMEOUT``, then calls ``resolve``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import quote

import httpx

from ._config import MeshConfig, ServicePolicy, load_config
from ._exceptions import CircuitOpen, ConfigError, NoHealthyEndpoints
from ._service import ServiceState
from ._status import status_report
from .discovery import (
    Discovery,
    Endpoint,
    Snapshot,
    StaticDiscovery,
    check_discovery,
    make_discovery,
)
from .discovery._consul import TargetKey
from .instance import Instance
from .resilience._pending import PendingRequests, Ticket
from .routing import Chain, Decision, Target, compile_filter
from .routing._consul import CompiledChain
from .routing._filter import EndpointView, Predicate
from .routing._local import LocalConfigFile
from .routing._propagate import carry
from .routing._sticky import request_key
from .routing._upstream import UpstreamConfig, parse_upstream_config
from .security import Security
from .telemetry import setup as setup_telemetry
from .telemetry._admin import report_status
from .telemetry._instruments import report_certificates, report_service_states
from .telemetry._metrics import REGISTRY
from .telemetry._names import SERVICE_NAME

__all__ = ["Mesh", "Pending", "live_meshes"]

_CONSUL_SUFFIX = ".service.consul"

logger = logging.getLogger("meshlib.routing")

#: a service's routing: from the local config file, or Consul's compiled discovery chain
RoutingChain = Chain | CompiledChain


class Pending(NamedTuple):
    """A host that may be a mesh service; discovery must be waited for once."""

    service: str
    host: str


class Mesh:
    """One configuration's mesh: the owner of its discovery, its security (TLS contexts
    and their renewal, egress policy, authorizer), its server instance and the state of
    every service it calls (ejections, retry budgets, breakers).

    Clients and middlewares made without ``mesh=`` share the process's mesh for their
    configuration (``Mesh.for_config``), as a sidecar would be shared; that one lives as
    long as the process. A mesh made here belongs to its maker: pass it as ``mesh=`` to
    ``Client``, ``AsyncClient``, ``ASGIMiddleware`` or ``WSGIMiddleware``, and close it
    (or use it as a context manager) when done -- a test's or an embedded server's own.

    Args:
        config: the configuration (default: read from the environment now).
        discovery: a discovery source to use instead of the one ``config`` names.

    Raises:
        meshlib.ConfigError: the environment holds a bad ``MESH_*``/``CONSUL_*`` value, or
            TLS material it names cannot be loaded.
    """

    def __init__(
        self, config: MeshConfig | None = None, discovery: Discovery | None = None
    ) -> None:
        config = load_config() if config is None else config
        self.config = config
        self.security = Security(config)  # first: a missing CA stops start-up here
        try:
            check_discovery(config)
            self.local = _local_config(config)
        except BaseException:
            self.security.close()  # a bad value stops start-up, leaving no renewal behind
            raise
        setup_telemetry(config)  # the process's tracer and exporters (OpenTelemetry's are
        # process-wide: the first configuration installs them, later ones add labels)
        self._given = discovery
        #: the discovery in use, once the first call out started it
        self._discovery: Discovery | None = None
        self._instance: Instance | None = None
        #: host as written in URLs ("weather", "weather.service.consul") -> state
        self._services: dict[str, ServiceState] = {}
        #: (service, filter, datacenter, OnlyPassing) -> (target, the state of its endpoints,
        #: its subset predicate, whether discovery watches it itself: Consul's filtered
        #: health query)
        self._targets: dict[
            tuple[str, str, str, bool], tuple[Target, ServiceState, Predicate | None, bool]
        ] = {}
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()  # not _lock: discovery may answer at once
        self._closed = False
        # Consul's discovery chains and per-target watches (ConsulDiscovery with chains),
        # known once discovery is connected
        self._consul_chain: Any = None
        self._consul_target: Any = None
        self._chain_known: Any = None
        #: this process's service-defaults UpstreamConfig (passive health per destination)
        self._upstream = UpstreamConfig()
        #: whether Consul caps the requests in flight to any destination
        self._capped = False
        self._pending = PendingRequests()
        self._upstream_refused: str | None = None
        with _registry_lock:
            _open.append(self)

    @property
    def discovery(self) -> Discovery:
        """Where this mesh learns its services' endpoints: started on the first call out.

        A server that never calls out starts no watch, and a pre-forking server's parent
        (which builds its app before forking) leaves none behind in its workers: each
        starts its own on its first call (threads do not follow a fork).
        """
        discovery = self._discovery
        if discovery is not None:
            return discovery
        return self._connect()

    def _connect(self) -> Discovery:
        with self._connect_lock:
            if self._discovery is not None:
                return self._discovery
            if self._closed:
                raise RuntimeError("this mesh is closed")
            discovery, config = self._given, self.config
            if discovery is None and self.local is not None and config.discovery == "static":
                static = StaticDiscovery(config.static_services, self.local.current().services)
                self.local.subscribe(lambda new: static.update(new.services))
                discovery = static
            if discovery is None:
                discovery = make_discovery(config)
            discovery.subscribe(self._on_snapshot)
            self._consul_chain = getattr(discovery, "chain", None)
            self._consul_target = getattr(discovery, "target", None)
            self._chain_known = getattr(discovery, "chain_known", None)
            subscribe_targets = getattr(discovery, "subscribe_targets", None)
            if subscribe_targets is not None:
                subscribe_targets(self._on_target_snapshot)
            watch = getattr(discovery, "watch", None)
            if watch is not None and config.service_name and self._consul_chain is not None:
                path = "/v1/config/service-defaults/" + quote(config.service_name, safe="")
                watch(path, self._on_service_defaults, missing_ok=True)
            self._discovery = discovery
            return discovery

    # ---------------------------------------------------------------- classification

    def lookup(self, host: str) -> ServiceState | Pending | None:
        """The mesh service ``host`` names, ``Pending``, or ``None`` for a foreign host."""
        state = self._services.get(host)
        if state is not None:
            return state
        name = _service_name(host)
        if name is None:
            return None
        known = self.discovery.knows(name)
        if known is False:
            self._refuse_if_consul_name(name, host)
            return None
        snapshot = self.discovery.snapshot(name)
        # Its endpoints may be known a moment before its discovery chain: the first request
        # waits for both (discovery.wait), or it would go out unrouted.
        if snapshot is None or (self._chain_known is not None and not self._chain_known(name)):
            return Pending(name, host)
        return self._state(name, host, snapshot)

    def resolve(self, pending: Pending) -> ServiceState | None:
        """After ``discovery.wait``: the service's state, or ``None`` if it is not a service."""
        # "not in the catalog" first: discovery may answer an unknown service with an
        # empty snapshot (Consul's health API does), which is no mesh service either
        known = self.discovery.knows(pending.service)
        if known is False:
            self._refuse_if_consul_name(pending.service, pending.host)
            return None
        snapshot = self.discovery.snapshot(pending.service)
        if snapshot is not None:
            return self._state(pending.service, pending.host, snapshot)
        raise NoHealthyEndpoints(
            f"service {pending.service!r}: discovery did not answer within "
            f"{self.config.discovery_timeout:g}s (is Consul reachable?)",
            service=pending.service,
        )

    def unknown_service(self, host: str, exc: Exception) -> Exception:
        """``exc`` (a pass-through request to ``host`` failed to connect) as the error to
        raise: ``NoHealthyEndpoints`` saying where meshlib looked when ``host`` could have
        been a service name and DNS did not know it either, else ``exc`` itself."""
        name = _service_name(host)
        if name is None or not _is_dns_failure(exc):
            return exc
        config = self.config
        if config.discovery == "consul" and config.consul is not None:
            looked = f"Consul at {config.consul.address} has no service {name!r}"
            if getattr(self.discovery, "catalog_filtered", False):
                return NoHealthyEndpoints(
                    f"{name!r} is not a mesh service this token can see: Consul at "
                    f"{config.consul.address} lists no service {name!r} to it, and its ACLs "
                    f"hide every service the token in CONSUL_HTTP_TOKEN lacks permission "
                    f"'service:read' on (or 'node:read' on the nodes it runs on); DNS does not "
                    f"know {name!r} either: check the name, register the service, or grant "
                    f'the token service:read on "{name}" and node:read',
                    service=name,
                )
        else:
            known = ", ".join(sorted(config.static_services)) or "no service"
            looked = f"MESH_STATIC_SERVICES lists {known}"
            if config.config_file:
                looked += f" and MESH_CONFIG_FILE={config.config_file} none named {name!r}"
        return NoHealthyEndpoints(
            f"{name!r} is not a mesh service ({looked}) and DNS does not know it either: "
            f"check the name, or register the service",
            service=name,
        )

    def wait_timeout(self) -> float:
        """How long a first request to a service may wait for discovery."""
        return self.config.discovery_timeout

    def _refuse_if_consul_name(self, name: str, host: str) -> None:
        """``<name>.service.consul`` promises a mesh service: an unknown one is an error."""
        if host.endswith(_CONSUL_SUFFIX):
            raise NoHealthyEndpoints(
                f"service {name!r} is not registered in discovery", service=name
            )

    def _state(self, name: str, host: str, snapshot: Snapshot) -> ServiceState:
        with self._lock:
            state = self._services.get(name)
            if state is None:
                state = ServiceState(name, self._policy(name))
                state.update(snapshot)
                self._services[name] = state
            self._services[host] = state
            return state

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        state = self._services.get(snapshot.service)
        if state is not None:
            state.update(snapshot)
        for target, target_state, predicate, remote in list(self._targets.values()):
            if target.service == snapshot.service and not remote:
                target_state.update(_subset(snapshot, predicate, target.only_passing))

    def _on_target_snapshot(self, key: TargetKey, snapshot: Snapshot) -> None:
        for only_passing in (False, True):  # the subsets of one filter may differ in it
            found = self._targets.get((*key, only_passing))
            if found is not None and found[3]:
                found[1].update(snapshot.only_passing() if only_passing else snapshot)

    # ---------------------------------------------------------------- traffic management

    def _policy(self, service: str) -> ServicePolicy:
        """The environment's policy for ``service`` with Consul's upstream settings on top."""
        return self._upstream.policy(service, self.config.policy(service))

    def _on_service_defaults(self, body: Any, index: int) -> None:
        """A new answer for this process's ``service-defaults`` (discovery thread)."""
        try:
            upstream = parse_upstream_config(body)
        except ValueError as exc:
            if str(exc) != self._upstream_refused:  # one error per distinct problem
                self._upstream_refused = str(exc)
                logger.error(
                    "service-defaults %r is refused (%s); keeping the last good settings",
                    self.config.service_name,
                    exc,
                )
            return
        self._upstream_refused = None
        if upstream == self._upstream:
            return
        self._upstream = upstream
        self._capped = upstream.limits_anything()
        states = {id(s): s for s in list(self._services.values())}
        states.update((id(t[1]), t[1]) for t in list(self._targets.values()))
        for state in states.values():
            policy = self._policy(state.name)
            if policy != state.policy:
                state.apply_policy(policy)

    def route(
        self, state: ServiceState, request: httpx.Request
    ) -> tuple[ServiceState, Decision | None]:
        """The state of the endpoints this request goes to, and the routing decision.

        ``CircuitOpen`` when Consul's ``Limits.MaxConcurrentRequests`` for the destination
        is reached (routing/_upstream.py).

        First the marks of the inbound request being served (``MESH_PROPAGATE_HEADERS``,
        routing/_propagate.py) go on the request, so this hop's router sees them too.
        """
        carry(request)
        chosen, decision = self._route(state, request)
        if decision is not None and decision.target.load_balancer is not None:
            decision = self._balance_as_resolved(chosen, decision, request)
        if decision is not None:  # the split's RequestHeaders, then the route's edits
            if decision.split_edits is not None:
                decision.split_edits.apply_request(request)
            if decision.edits is not None:
                decision.edits.apply_request(request)
        if self._capped:
            cap = self._upstream.max_concurrent(chosen.name)
            # Counted from the balancer's per-endpoint in-flight counters: no extra state,
            # and like Envoy's circuit breakers a check, not a reservation (concurrent
            # requests may overshoot by a few).
            if cap is not None and sum(e.in_flight for e in chosen.endpoints) >= cap:
                raise CircuitOpen(
                    f"service {chosen.name!r}: {cap} requests in flight, the most its "
                    f"service-defaults UpstreamConfig Limits.MaxConcurrentRequests allows",
                    service=chosen.name,
                    request=request,
                )
        return chosen, decision

    def pending(self, chosen: ServiceState, request: httpx.Request) -> Ticket | None:
        """None when the request may go now; a ``Ticket`` when it must wait for a connection.

        Consul's ``Limits.MaxConnections`` / ``MaxPendingRequests`` for the destination
        (resilience/_pending.py): ``CircuitOpen`` when too many already wait. The transports
        poll the ticket and leave it. Without those limits: one attribute check.
        """
        if not self._capped:
            return None
        limits = self._upstream.connection_limits(chosen.name)
        if limits is None:
            return None
        return self._pending.enter(
            chosen.name,
            request,
            limits.max_connections,
            limits.max_pending,
            lambda: sum(e.in_flight for e in chosen.endpoints),
            chosen.policy.timeout,
        )

    def _balance_as_resolved(
        self, chosen: ServiceState, decision: Decision, request: httpx.Request
    ) -> Decision:
        """Apply the resolver's ``LoadBalancer`` (routing/_load_balancer.py) to ``chosen``.

        Its policy replaces ``chosen``'s balancer once, when it first differs (a new
        balancer, as for any policy change); its hash policies give the request's key.
        """
        balancer = decision.target.load_balancer
        assert balancer is not None
        if balancer.policy and chosen.policy.lb != balancer.policy:
            with self._lock:
                if chosen.policy.lb != balancer.policy:
                    lb: Any = balancer.policy
                    chosen.apply_policy(dataclasses.replace(chosen.policy, lb=lb))
        if not balancer.hash_policies:
            return decision
        key = balancer.key(request.headers, dict(request.url.params))
        return dataclasses.replace(decision, hash_key=key)

    def _route(
        self, state: ServiceState, request: httpx.Request
    ) -> tuple[ServiceState, Decision | None]:
        """``route`` without the concurrency cap.

        Without routing configuration for the service: the service itself. Otherwise its
        chain picks a route, a split and a subset (routing/_chain.py); an empty target
        fails over to the resolver's failover targets that have endpoints.

        The chain comes from the local config file if it has one for the service, else from
        Consul's discovery chain (the last one its watch delivered: a dict lookup, no I/O).
        Without either, this costs two dict lookups and routes as if there were no chains.
        """
        chain: RoutingChain | None = None
        local = self.local
        if local is not None:
            chain = local.current().chains.get(state.name)
        if chain is None and self._consul_chain is not None:
            chain = self._consul_chain(state.name)
        if chain is None:
            return state, None
        url = request.url
        sticky_key = request_key(state.policy.split_hash_on, request.headers)
        decision = chain.decide(
            request.method, url.path, request.headers, dict(url.params), sticky_key=sticky_key
        )
        target = decision.target
        if (
            not target.subset
            and target.service == state.name
            and not target.datacenter
            and not target.only_passing
        ):
            if state.endpoints or not target.failover:
                return state, decision
            chosen = state
        else:
            chosen = self._target_state(target, state.name)
        if not chosen.endpoints:
            for fallback in target.failover:
                if fallback.datacenter and self._consul_target is None:
                    continue  # other datacenters need Consul
                candidate = self._target_state(fallback, state.name)
                if candidate.endpoints:
                    return candidate, decision
        return chosen, decision

    def _target_state(self, target: Target, home: str) -> ServiceState:
        """The endpoints of ``target``, one of the targets of ``home``'s chain."""
        key = (target.service, target.filter, target.datacenter, target.only_passing)
        found = self._targets.get(key)
        if found is not None:
            return found[1]
        with self._lock:
            found = self._targets.get(key)
            if found is not None:
                return found[1]
            state = ServiceState(target.service, self._policy(target.service))
            remote = self._consul_target is not None and bool(
                target.filter or target.datacenter or target.service != home
            )
            predicate = None
            if remote:
                # Consul filters the subset and answers for other datacenters; the watch
                # usually runs already (started when the chain arrived, so even the first
                # request to another service of the chain finds its endpoints).
                assert self._consul_target is not None
                self._targets[key] = (target, state, None, True)
                snapshot = self._consul_target(target)
                if snapshot is not None:
                    state.update(_subset(snapshot, None, target.only_passing))
                    latest = self._consul_target(target)  # an answer that raced the first
                    if latest is not None and latest is not snapshot:
                        state.update(_subset(latest, None, target.only_passing))
                return state
            predicate = compile_filter(target.filter) if target.filter else None
            snapshot = self.discovery.snapshot(target.service)
            if snapshot is not None:
                state.update(_subset(snapshot, predicate, target.only_passing))
            self._targets[key] = (target, state, predicate, False)
            return state

    def services(self) -> dict[str, ServiceState]:
        """The services this process has called, by name."""
        return {state.name: state for state in list(self._services.values())}

    @property
    def instance(self) -> Instance:
        """This process's server instance for the configuration: made on first use, and
        made anew after the last one stopped (a server restarted in the same process)."""
        with self._lock:
            if self._instance is None or self._instance.stopped:
                self._instance = Instance(self.config)
            return self._instance

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop discovery, certificate renewal and the instance's registration watch (the
        registration itself stays to the server's drain). The mesh is unusable afterwards."""
        with _registry_lock:
            if self._closed:
                return
            self._closed = True
            for registry in (_open, _shared):
                if self in registry:  # not in a forked child's: it inherited this one
                    registry.remove(self)
        if self._discovery is not None:
            self._discovery.close()
        elif self._given is not None:
            self._given.close()
        self.security.close()
        if self._instance is not None:
            self._instance.close()

    # ---------------------------------------------------------------- process default

    @classmethod
    def for_config(cls, config: MeshConfig) -> Mesh:
        """The process's mesh for ``config``: shared by every client and server built from
        it (made on first use; ``close`` ends it, and the next call makes a new one)."""
        with _registry_lock:
            for mesh in _shared:
                if mesh.config == config:
                    return mesh
            mesh = cls(config)
            _shared.append(mesh)
            return mesh


def _local_config(config: MeshConfig) -> LocalConfigFile | None:
    if config.config_file is None:
        return None
    try:
        return LocalConfigFile(config.config_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"MESH_CONFIG_FILE={config.config_file!r}: expected a valid local config file ({exc})"
        ) from None


def _subset(snapshot: Snapshot, predicate: Predicate | None, only_passing: bool) -> Snapshot:
    """A target's view of its service's ``snapshot``: the instances its subset's filter
    selects, those whose checks warn unhealthy with the subset's ``OnlyPassing``."""
    if only_passing:
        snapshot = snapshot.only_passing()
    if predicate is None:
        return snapshot

    def kept(endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        service = snapshot.service
        return tuple(
            e
            for e in endpoints
            if predicate(EndpointView(service, e.id, e.host, e.port, e.node, e.meta, e.tags))
        )

    return Snapshot(
        snapshot.service, kept(snapshot.endpoints), snapshot.index, kept(snapshot.unhealthy)
    )


def _service_name(host: str) -> str | None:
    """The service a URL host may name, or None if it cannot be a mesh service."""
    if host.endswith(_CONSUL_SUFFIX):
        return host[: -len(_CONSUL_SUFFIX)] or None
    if "." in host or ":" in host or host == "localhost":
        return None  # a DNS name, an IPv4 or IPv6 literal, or this host
    return host


def _is_dns_failure(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    for _ in range(8):  # httpcore and anyio wrap the resolver's error once or twice
        if cause is None:
            return False
        if isinstance(cause, socket.gaierror):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


#: every mesh of this process not closed yet (what its metrics and /mesh/status report)
_open: list[Mesh] = []
#: those ``for_config`` made, shared by configuration
_shared: list[Mesh] = []
_registry_lock = threading.RLock()  # for_config holds it while a new mesh joins _open


def _after_fork_in_child() -> None:
    """A pre-forking server's worker keeps its parent's meshes (the app was built before
    the fork, and the parent registered the instance and drains it for the workers), but
    not a watching discovery: its thread stayed behind, so the worker starts its own on
    its next call out, with a fresh view of its destinations. (A discovery that
    ``survives_fork``, static discovery, has no thread: the worker keeps it, and the state
    of every destination.)"""
    global _registry_lock
    _registry_lock = threading.RLock()  # another thread may have held it at the fork
    for mesh in _open:
        mesh._lock = threading.Lock()
        mesh._connect_lock = threading.Lock()
        discovery = mesh._discovery
        if mesh._given is None and discovery is not None and not discovery.survives_fork:
            mesh._discovery = None
            mesh._services = {}
            mesh._targets = {}


os.register_at_fork(after_in_child=_after_fork_in_child)


def live_meshes() -> list[Mesh]:
    """The process's meshes still open (what its metrics and ``/mesh/status`` report)."""
    with _registry_lock:
        return list(_open)


# The gauges over the meshes' parts, registered by their owner: exported like every other
# metric (Prometheus text and OTLP), read when scraped.
report_service_states(
    lambda: [
        (mesh.config.service_name or "", state)
        for mesh in live_meshes()
        for state in mesh.services().values()
    ]
)
report_status(lambda: status_report(live_meshes()))


def _certificates() -> list[tuple[str, float]]:
    """(service, expiry) of each certificate in use: the newest, swapped in on rotation."""
    return [
        (tls.material.identity.service, tls.material.not_after.timestamp())
        for mesh in live_meshes()
        if (tls := mesh.security.tls) is not None
    ]


report_certificates(_certificates)


def _instances() -> dict[str, list[Instance]]:
    by_service: dict[str, list[Instance]] = {}
    for mesh in live_meshes():
        instance = mesh._instance
        if instance is not None and not instance.stopped:
            by_service.setdefault(mesh.config.service_name or "", []).append(instance)
    return by_service


def _readiness() -> Iterator[tuple[tuple[str, ...], float]]:
    for service, instances in _instances().items():
        yield (service,), 1.0 if any(i.ready for i in instances) else 0.0


def _in_flight() -> Iterator[tuple[tuple[str, ...], float]]:
    for service, instances in _instances().items():
        yield (service,), float(sum(i.in_flight for i in instances))


REGISTRY.gauge(
    "meshlib.ready",
    "1",
    "1 while this instance is ready to receive traffic (0 while starting or draining).",
    (SERVICE_NAME,),
    _readiness,
)
REGISTRY.gauge(
    "meshlib.inbound.requests.in_flight",
    "1",
    "Requests this instance is handling.",
    (SERVICE_NAME,),
    _in_flight,
)
