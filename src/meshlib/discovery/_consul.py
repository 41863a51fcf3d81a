"""Endpoints from Consul, the whole datacenter watched with a few blocking queries.

The request path must never wait on Consul, so every service the process has mentioned is
kept current in the background, and the request path only reads the latest immutable
``Snapshot``: a dict lookup, no lock, no I/O.

Scale by design. A blocking query per service (what 0.1 did) holds a connection per
service, and Consul allows a client 200 (``limits.http_max_conns_per_client``): past about
75 services with their chains, watches took turns and a change took a minute to arrive.
Instead, one blocking query on ``/v1/internal/ui/nodes`` answers with every node, service
instance and check of the datacenter whenever any of them changes; each watched service's
instances are derived from it exactly as Consul's ``/v1/health/service/<name>`` (or
``/v1/health/connect/<name>``) would list them (``_health.group_dump``), and only services
whose instances changed are published. A service called for the first time is answered
from the last dump at once: no query, no turn to wait for.

Discovery chains follow the same idea: three blocking queries on the lists of
``service-router``, ``service-splitter`` and ``service-resolver`` entries. A service named
by none of them has Consul's default chain (no query); a service with entries has its
compiled chain read once (``/v1/discovery-chain/<name>``) and again only when an entry it
depends on (its own, or one of a service its chain sends to) changes. Subsets (a filter
Consul evaluates) are read when their service changes; targets in another datacenter keep
a blocking query of their own.

So a process holds five connections to its agent however many services it calls (the dump,
three entry lists, one for reads), and the cost of a change is one dump, which grows with
the datacenter: measured in docs/consul.md.

The blocking-query etiquette and "no blind spot" (every watch re-asks from index 0 when
one of them sees Consul restart) live in the engine (``meshlib.consul``). A restarted dev
agent comes back empty: for ``grace`` seconds after such a reset, a service that had
instances and now has none keeps its last known ones (as Eureka's self-preservation does),
until instances reappear or the grace ends, logged once. A control plane that blinks must
not empty the data plane: while Consul is unreachable the last known endpoints stay in
service (as Envoy and Linkerd do).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from contextlib import suppress
from functools import partial
from typing import Any
from urllib.parse import quote

from .._config import ConsulSettings
from .._endpoint import Snapshot, SnapshotListener
from ..consul import BadAnswer, Engine, reason
from ..routing._chain import Target
from ..routing._consul import CompiledChain, compile_chain
from ._health import endpoints, fingerprint, group_dump

__all__ = ["ConsulDiscovery", "TargetKey"]

#: a chain target's instances: (service, Consul filter expression, datacenter or "")
TargetKey = tuple[str, str, str]

logger = logging.getLogger("meshlib.discovery")

DUMP = "/v1/internal/ui/nodes"
#: the config entries a discovery chain is compiled from
CHAIN_KINDS = ("service-router", "service-splitter", "service-resolver")


class ConsulDiscovery:
    """Discovery from Consul: the datacenter's node dump, config entries and chains.

    ``settings`` says where the agent is and how to authenticate; ``engine`` is the
    process's watcher (``Engine.shared``) or, by default, one of its own made with
    ``wait``, ``min_interval`` and ``max_backoff``. With ``connect``, instances are the
    Connect-capable ones (mesh mTLS). ``grace`` is how long a service keeps its last known
    instances when Consul comes back from a restart without any.

    A service is watched from the first ``snapshot()`` (or ``wait()``) that mentions it, for
    the life of the discovery; ``close()`` stops the watches.

    With ``chains``, each watched service's compiled discovery chain is followed too, and
    every target of a chain that selects a subset or another datacenter is watched
    (``target()``). A new chain is published only once its new targets have answered, so a
    request never sees a chain whose targets look empty merely because nobody asked yet.
    """

    #: its watches run on a thread, which a fork leaves behind: a forked worker starts anew
    survives_fork = False

    def __init__(
        self,
        settings: ConsulSettings,
        *,
        wait: float = 30.0,
        min_interval: float = 0.1,
        max_backoff: float = 1.0,
        connect: bool = False,
        chains: bool = False,
        grace: float = 30.0,
        engine: Engine | None = None,
    ) -> None:
        self._shared = engine is not None
        self._engine = engine or Engine(
            settings, wait=wait, min_interval=min_interval, max_backoff=max_backoff, log=logger
        )
        self._connect = connect
        #: mesh mTLS everywhere: Connect-capable instances (native and sidecar proxies)
        self._health_path = "/v1/health/connect/" if connect else "/v1/health/service/"
        self._grace = grace

        #: service -> latest snapshot. Replaced item by item, never mutated in place.
        self._snapshots: dict[str, Snapshot] = {}
        #: every service name in the catalog; None until the dump first answers.
        self._services: frozenset[str] | None = None
        self._watched: set[str] = set()
        self._listeners: tuple[SnapshotListener, ...] = ()
        self._chains_on = chains
        #: service -> its chain (None: the default chain); set once the chain is usable
        self._chains: dict[str, CompiledChain | None] = {}
        #: target -> latest snapshot of its instances (replaced, never mutated)
        self._target_snapshots: dict[TargetKey, Snapshot] = {}
        self._target_listeners: tuple[Callable[[TargetKey, Snapshot], None], ...] = ()
        self._lock = threading.Lock()  # starting watches, subscribing, closing; never I/O
        self._changed = threading.Condition()  # wakes wait() on new snapshots / catalog
        self._closed = False

        # engine thread only, from here on
        self._grouped: dict[str, list[Any]] = {}  # the last dump, per service
        self._index = 0  # the last dump's index
        self._prints: dict[str, object] = {}  # service -> fingerprint of its last dump
        self._reset_at: float | None = None  # loop time of the last reset (for the grace)
        self._kept: set[str] = set()  # services held on their last instances (grace)
        self._refused: dict[str, str] = {}  # service -> why its instances were refused
        self._entries: dict[str, dict[str, int]] = {}  # kind -> entry name -> ModifyIndex
        self._deps: dict[str, frozenset[str]] = {}  # service -> entry names its chain uses
        self._loading: dict[str, bool] = {}  # chain reads in progress -> asked again meanwhile
        self._chain_failing: set[str] = set()
        self._chain_pending: set[str] = set()  # watched before the entry lists answered
        self._chain_refused: dict[str, str] = {}
        self._target_first: dict[TargetKey, asyncio.Event] = {}
        self._target_prints: dict[TargetKey, object] = {}
        self._target_loading: dict[TargetKey, bool] = {}

        self._stops = [self._engine.watch(DUMP, self._on_dump)]
        if chains:
            self._stops += [
                self._engine.watch(f"/v1/config/{kind}", partial(self._on_entries, kind))
                for kind in CHAIN_KINDS
            ]
        self._stops.append(self._engine.on_reset(self._on_reset))

    # ------------------------------------------------------------------ the Discovery API

    def snapshot(self, service: str) -> Snapshot | None:
        """The latest snapshot of ``service``, or None before its first answer. Never blocks.

        The first call for a service starts watching it.
        """
        if service not in self._watched:
            self._watch(service)
        return self._snapshots.get(service)

    def knows(self, service: str) -> bool | None:
        """Whether ``service`` is in Consul's catalog; None before the catalog first answered."""
        snapshot = self._snapshots.get(service)
        if snapshot is not None and (snapshot.endpoints or snapshot.unhealthy):
            return True  # kept through a reset, or the catalog not caught up yet
        services = self._services
        return None if services is None else service in services

    def wait(self, service: str, timeout: float) -> Snapshot | None:
        """Block up to ``timeout`` seconds for the first answer about ``service``.

        Returns None at once when the catalog says the service does not exist, and a
        snapshot without endpoints when it exists but has no healthy instance.
        """
        self.snapshot(service)  # starts the watch
        with self._changed:
            self._changed.wait_for(lambda: self._closed or self._settle(service)[0], timeout)
        return self._settle(service)[1]

    def _settle(self, service: str) -> tuple[bool, Snapshot | None]:
        """(whether discovery can answer for ``service`` now, that answer)."""
        snapshot = self._snapshots.get(service)
        if self._chains_on and service not in self._chains:
            return False, snapshot  # its routing is not known yet
        if snapshot is not None and snapshot.endpoints:
            return True, snapshot
        services = self._services
        if services is None:  # not answered yet
            return False, snapshot
        if service not in services:
            return True, None
        return snapshot is not None, snapshot

    @property
    def catalog_filtered(self) -> bool:
        """Whether Consul's ACLs removed entries from the last datacenter answer: a service
        missing from it may exist, hidden from this token (no ``service:read`` or
        ``node:read`` on it)."""
        return self._engine.filtered.get(DUMP, False)

    def chain_known(self, service: str) -> bool:
        """Whether ``service``'s chain has settled (so its first request may be routed)."""
        return not self._chains_on or service in self._chains

    def chain(self, service: str) -> CompiledChain | None:
        """The latest good discovery chain of ``service``; None for the default chain.

        A dict lookup: requests read the last chain, never Consul. Needs ``chains=True``.
        """
        return self._chains.get(service)

    def target(self, target: Target) -> Snapshot | None:
        """The latest instances of ``target`` (its service, subset filter and datacenter).

        The first call for a target starts its watch; None until it first answers.
        """
        key = (target.service, target.filter, target.datacenter)
        snapshot = self._target_snapshots.get(key)
        if snapshot is None:
            self._engine.call_soon(self._watch_target, key)
        return snapshot

    def subscribe_targets(self, listener: Callable[[TargetKey, Snapshot], None]) -> None:
        """Call ``listener(key, snapshot)`` on the watch thread for each target answer."""
        with self._lock:
            self._target_listeners = (*self._target_listeners, listener)

    def subscribe(self, listener: SnapshotListener) -> None:
        """Call ``listener(snapshot)`` on the watch thread for every new snapshot.

        A listener that raises is logged and stays subscribed; it cannot stop the watches.
        """
        with self._lock:
            self._listeners = (*self._listeners, listener)

    def watch(
        self,
        path: str,
        answer: Callable[[Any, int], None],
        params: Mapping[str, str] | None = None,
        *,
        missing_ok: bool = False,
    ) -> None:
        """Keep a blocking query on ``path`` going on the watch thread (``Engine.watch``)."""
        self._stops.append(self._engine.watch(path, answer, params, missing_ok=missing_ok))

    def close(self) -> None:
        """Stop every watch (and the engine, unless it is shared). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._shared:
            for stop in self._stops:
                stop()
            self._engine.release()
        else:
            self._engine.close()
        with self._changed:
            self._changed.notify_all()

    def __enter__(self) -> ConsulDiscovery:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calling threads

    def _watch(self, service: str) -> None:
        with self._lock:
            if service in self._watched or self._closed:
                return
            self._watched.add(service)
        self._engine.call_soon(self._start, service)

    # ------------------------------------------------------------------ the watch thread

    def _start(self, service: str) -> None:
        if self._services is not None:
            self._derive(service)  # answered from the last dump, at once
        if self._chains_on:
            self._chain_changed(service)

    def _on_dump(self, body: Any, index: int) -> None:
        services, grouped = group_dump(body, connect=self._connect)
        self._grouped, self._index = grouped, index
        first = self._services is None
        for service in list(self._watched):
            self._derive(service)
        for key in list(self._target_first):
            if not key[2]:  # a local target: read again when its service changed
                self._target_changed(key)
        if services != self._services or first:
            self._services = services
            with self._changed:
                self._changed.notify_all()

    def _derive(self, service: str) -> None:
        """Publish ``service``'s instances from the last dump, if they changed."""
        entries = self._grouped.get(service, [])
        try:
            healthy, unhealthy = endpoints(entries)
        except BadAnswer as exc:
            if self._refused.get(service) != str(exc):
                self._refused[service] = str(exc)
                logger.error(
                    "instances of %r refused (%s); keeping the last good ones", service, exc
                )
            return
        self._refused.pop(service, None)
        print_ = fingerprint(healthy, unhealthy)
        if print_ == self._prints.get(service) and service in self._snapshots:
            return
        last = self._snapshots.get(service)
        if not entries and last is not None and last.endpoints and self._in_grace():
            if service not in self._kept:
                self._kept.add(service)
                logger.warning(
                    "Consul came back without any instance of %r; keeping its %d last known "
                    "instances for up to %gs, until some reappear",
                    service,
                    len(last.endpoints),
                    self._grace,
                )
            return
        if service in self._kept:
            self._kept.discard(service)
            logger.info("instances of %r are known again after the reset", service)
        self._prints[service] = print_
        logger.debug(
            "service %s: %d healthy endpoints, %d unhealthy", service, len(healthy), len(unhealthy)
        )
        self._publish(Snapshot(service, healthy, self._index, unhealthy))

    def _in_grace(self) -> bool:
        loop = asyncio.get_running_loop()
        return self._reset_at is not None and loop.time() < self._reset_at + self._grace

    def _on_reset(self) -> None:
        """Consul restarted or came back: a grace for emptied services; chains re-read."""
        loop = asyncio.get_running_loop()
        self._reset_at = loop.time()
        loop.call_later(self._grace, self._grace_over)
        if self._chains_on:
            for service in list(self._watched):
                self._chain_changed(service)

    def _grace_over(self) -> None:
        if self._kept and not self._in_grace():
            for service in list(self._kept):
                self._derive(service)

    def _publish(self, snapshot: Snapshot) -> None:
        self._snapshots[snapshot.service] = snapshot  # one assignment: readers take no lock
        with self._changed:
            self._changed.notify_all()
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:
                logger.exception("snapshot listener %r failed", listener)

    # ------------------------------------------------------------------ chains

    def _on_entries(self, kind: str, body: Any, index: int) -> None:
        if not isinstance(body, list) or not all(isinstance(e, dict) for e in body):
            raise BadAnswer(f"the {kind} entries are not a JSON list of objects")
        now = {str(e.get("Name")): e.get("ModifyIndex") for e in body}
        before = self._entries.get(kind)
        self._entries[kind] = {name: int(i) if isinstance(i, int) else 0 for name, i in now.items()}
        if before is None:
            changed = set(now)
        else:
            changed = {n for n in set(now) | set(before) if now.get(n) != before.get(n)}
        if self._chain_pending and self._named("") is not None:
            pending, self._chain_pending = self._chain_pending, set()
            for service in pending:
                self._chain_changed(service)
        if changed:
            for service in list(self._watched):
                if self._deps.get(service, frozenset({service})) & changed:
                    self._chain_changed(service)

    def _named(self, service: str) -> bool | None:
        """Whether an entry names ``service``; None while a kind's list is not known yet."""
        if len(self._entries) < len(CHAIN_KINDS):
            return None
        return any(service in names for names in self._entries.values())

    def _chain_changed(self, service: str) -> None:
        """Read ``service``'s chain again (coalesced: one read at a time per service)."""
        if service in self._loading:
            self._loading[service] = True
            return
        named = self._named(service)
        if named is None:  # the entry lists answer first (within ms), then it is decided
            self._chain_pending.add(service)
            return
        if not named and self._deps.get(service, frozenset()) <= {service}:
            self._deps[service] = frozenset({service})
            self._engine.spawn(self._publish_chain(service, None))  # the default chain
            return
        self._loading[service] = False
        self._engine.spawn(self._load_chain(service))

    async def _load_chain(self, service: str) -> None:
        try:
            try:
                body, _ = await self._engine.fetch("/v1/discovery-chain/" + quote(service, safe=""))
            except Exception as exc:
                # Consul answers 500 when Connect is disabled on its servers (discovery chains
                # need it): route without chains rather than hold first requests or call it
                # an outage; the dump watch reports a real one.
                if service not in self._chain_failing:
                    self._chain_failing.add(service)
                    logger.warning(
                        "the discovery chain of %r is unavailable (%s); routing without it",
                        service,
                        reason(exc),
                    )
                self._chain_settled(service)
                return
            if service in self._chain_failing:
                self._chain_failing.discard(service)
                logger.info("the discovery chain of %r is available again", service)
            try:
                chain = compile_chain(body)
            except ValueError as exc:
                # Consul answered, so this is no outage: keep the last good chain, say so once
                # per distinct problem.
                if self._chain_refused.get(service) != str(exc):
                    self._chain_refused[service] = str(exc)
                    logger.error(
                        "the discovery chain of %r is refused (%s); keeping the last good chain",
                        service,
                        exc,
                    )
                self._chain_settled(service)
                return
            self._chain_refused.pop(service, None)
            deps = {service} | ({t.service for t in chain.targets()} if chain else set())
            self._deps[service] = frozenset(deps)
            await self._publish_chain(service, chain)
        finally:
            again = self._loading.pop(service, False)
            if again:
                self._chain_changed(service)

    async def _publish_chain(self, service: str, chain: CompiledChain | None) -> None:
        if chain is not None:
            events = [self._watch_target(key) for key in _target_keys(chain)]
            waiting = [e.wait() for e in events if not e.is_set()]
            if waiting:  # bounded: a target that never answers must not freeze routing
                with suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*waiting), timeout=10.0)
        if service not in self._chains or self._chains[service] != chain:
            logger.debug("service %s: new discovery chain", service)
        self._chains[service] = chain  # one assignment: requests read it without a lock
        self._chain_settled(service)

    def _chain_settled(self, service: str) -> None:
        if service not in self._chains:
            self._chains[service] = None
        with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ chain targets

    def _watch_target(self, key: TargetKey) -> asyncio.Event:
        """Start watching ``key``'s instances (watch thread); its first-answer event."""
        event = self._target_first.get(key)
        if event is not None:
            return event
        event = self._target_first[key] = asyncio.Event()
        service, _, datacenter = key
        if datacenter:  # another datacenter: not in this one's dump
            self._stops.append(
                self._engine.watch(
                    self._health_path + quote(service, safe=""),
                    partial(self._target_answer, key),
                    _target_params(key),
                    failed=partial(self._target_failed, key),
                )
            )
        else:
            self._target_changed(key)
        return event

    def _target_changed(self, key: TargetKey) -> None:
        service, expression, _ = key
        if not expression:  # another service of this datacenter: straight from the dump
            with suppress(BadAnswer):
                self._target_answer(key, self._grouped.get(service, []), self._index)
            return
        if key in self._target_loading:
            self._target_loading[key] = True
            return
        self._target_loading[key] = False
        self._engine.spawn(self._load_target(key))

    async def _load_target(self, key: TargetKey) -> None:
        try:
            path = self._health_path + quote(key[0], safe="")
            body, index = await self._engine.fetch(path, _target_params(key))
            self._target_answer(key, body, index)
        except Exception as exc:
            self._target_failed(key, reason(exc))
        finally:
            if self._target_loading.pop(key, False):
                self._target_changed(key)

    def _target_answer(self, key: TargetKey, body: Any, index: int) -> None:
        healthy, unhealthy = endpoints(body)
        print_ = fingerprint(healthy, unhealthy)
        if self._target_prints.get(key) == "failing":
            logger.info("instances of %s are answered again", _where(key))
        if print_ != self._target_prints.get(key):
            self._target_prints[key] = print_
            snapshot = Snapshot(key[0], healthy, index, unhealthy)
            self._target_snapshots[key] = snapshot
            for listener in self._target_listeners:
                try:
                    listener(key, snapshot)
                except Exception:
                    logger.exception("target listener %r failed", listener)
        self._target_first[key].set()

    def _target_failed(self, key: TargetKey, why: str) -> None:
        if self._target_prints.get(key) != "failing":  # once per failure streak
            self._target_prints[key] = "failing"
            logger.warning("instances of %s unavailable: %s", _where(key), why)
        # A target that cannot answer (another datacenter out of reach) counts as
        # answered: it is empty, and a chain waiting for it must not wait longer.
        self._target_first[key].set()


def _target_params(key: TargetKey) -> dict[str, str]:
    _, expression, datacenter = key
    params = {}
    if expression:
        params["filter"] = expression  # Consul evaluates the subset, as for Envoy
    if datacenter:
        params["dc"] = datacenter
    return params


def _where(key: TargetKey) -> str:
    service, expression, datacenter = key
    where = f" in {datacenter}" if datacenter else ""
    where += f" matching {expression!r}" if expression else ""
    return service + where


def _target_keys(chain: CompiledChain) -> set[TargetKey]:
    """The targets of ``chain`` (failover included) that need their own watch: subsets,
    other datacenters and other services (the chain's own service is watched)."""
    return {
        (t.service, t.filter, t.datacenter)
        for t in chain.targets()
        if t.filter or t.datacenter or t.service != chain.service
    }
