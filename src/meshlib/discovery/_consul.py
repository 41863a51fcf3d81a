"""Endpoints from Consul's health API, kept current by blocking queries on one thread.

The request path must never wait on Consul, so every service the process has mentioned is
watched in the background with a blocking query (a long poll that Consul answers as soon as
the service's healthy instances change), and the request path only reads the latest
immutable ``Snapshot``: a dict lookup, no lock, no I/O.

One thread, one asyncio event loop, one task per watched service. A thread per watch (what
py-consul's sync client would need, since each blocking query holds its caller for up to
``wait`` seconds) costs a thread for every service called; py-consul's async client runs on
aiohttp, a second HTTP stack next to the httpx meshlib is built on. So the watches use
plain ``httpx.AsyncClient``s. One more task watches ``/v1/catalog/services`` so ``knows()``
can tell "no such service" from "not answered yet" without a request per service.

Each watch has its own single-connection client, not one shared pool: a blocking query
holds its connection for up to ``wait``, and httpcore's pool (1.0.9) is not built for a
hundred requests that all stay in flight. Each time a request enters or leaves it, it scans
every connection once per queued request and once more per idle connection, and a request
that loses the race for a connection going idle retries in a loop. Measured: with 50
services and their discovery chains (100 blocking queries), the discovery thread burned
about 80% of a core while nothing changed; with a connection per watch it idles at 0%.
``_Slots`` keeps the total under Consul's per-client connection limit instead.

Blocking-query etiquette, as Consul's documentation asks of every client
(https://developer.hashicorp.com/consul/api-docs/features/blocking):

* send the last ``X-Consul-Index`` with a ``wait``; leave the HTTP timeout above ``wait``
  plus the up to ``wait / 16`` jitter Consul adds;
* if the index goes backwards (a restarted dev agent, a restored snapshot), reset it to 0,
  so the next query answers at once instead of blocking on an index that will not come;
* never block on an index of 0 or less: use 1;
* rate-limit each loop (``min_interval``): a flapping service must not turn the watch into
  a busy loop against the servers;
* on errors back off with full jitter (up to ``max_backoff``) and keep serving the last
  good snapshot. After an error the next query starts from index 0 as well: the agent may
  have restarted with a lower index, and a stale one would hide changes for up to ``wait``.

A control plane that blinks must not empty the data plane: while Consul is unreachable the
last known endpoints stay in service (as Envoy and Linkerd do), and the outage is logged once
when it starts and once when it ends, never per retry.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine, Mapping
from contextlib import suppress
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import httpx

from .._acl import FILTERED_HEADER, refusal
from .._config import ConsulSettings
from ..routing._chain import Target
from ..routing._consul import CompiledChain, compile_chain
from ._endpoint import Endpoint, Snapshot, SnapshotListener

__all__ = ["ConsulDiscovery", "TargetKey"]

#: a chain target's instances: (service, Consul filter expression, datacenter or "")
TargetKey = tuple[str, str, str]

logger = logging.getLogger("meshlib.discovery")

# Consul refuses more than 200 concurrent HTTP connections per client address by default
# (limits.http_max_conns_per_client). Each watch holds one connection for its blocking query,
# so stay below that with room for the application's own Consul clients; watches beyond this
# take turns (``_Slots``) instead of being refused.
_MAX_CONNECTIONS = 150


class _BadAnswer(Exception):
    """Consul answered, but not with something a watch can use."""


class _Refused(_BadAnswer):
    """Consul's ACLs refused the token (403): no outage, and said once per watch."""


class ConsulDiscovery:
    """Discovery from Consul: blocking queries on ``/v1/health/service/<name>``.

    ``settings`` says where the agent is and how to authenticate. ``wait`` is how long one
    blocking query may be held by Consul; ``min_interval`` is the shortest time between two
    queries of one watch; ``max_backoff`` caps the pause after an error. The last two exist
    mostly so tests can make them short.

    A service is watched from the first ``snapshot()`` (or ``wait()``) that mentions it, for
    the life of the discovery. Every watch runs on one daemon thread; ``close()`` stops it.

    With ``chains``, each watched service's compiled discovery chain
    (``/v1/discovery-chain/<service>``, the ``service-router``/``-splitter``/``-resolver``
    entries) is followed too, and every target of a chain that selects a subset or another
    datacenter gets its own health watch (``target()``): Consul evaluates the subset's
    filter (``filter=``) and answers for the other datacenter (``dc=``), as it does for
    Envoy. A new chain is published only once its new targets have answered, so a request
    never sees a chain whose targets look empty merely because nobody asked yet.
    """

    def __init__(
        self,
        settings: ConsulSettings,
        *,
        wait: float = 30.0,
        min_interval: float = 0.1,
        max_backoff: float = 2.0,
        connect: bool = False,
        chains: bool = False,
    ) -> None:
        if not wait > 0:
            raise ValueError(f"wait must be positive, not {wait!r}")
        if not (min_interval >= 0 and max_backoff > 0):
            raise ValueError("min_interval must be >= 0 and max_backoff > 0")
        self._address = settings.address
        #: mesh mTLS everywhere: Connect-capable instances (native and sidecar proxies)
        self._health_path = "/v1/health/connect/" if connect else "/v1/health/service/"
        self._wait_ms = max(1, round(wait * 1000))
        self._min_interval = min_interval
        self._max_backoff = max_backoff

        #: service -> latest snapshot. Replaced item by item, never mutated in place.
        self._snapshots: dict[str, Snapshot] = {}
        #: every service name in the catalog; None until the catalog first answers.
        self._services: frozenset[str] | None = None
        #: whether Consul's ACLs removed services from the last catalog answer: a service
        #: missing from it may exist, hidden from this token (no ``service:read`` on it)
        self.catalog_filtered = False
        self._watched: set[str] = set()
        self._listeners: tuple[SnapshotListener, ...] = ()
        self._chains_on = chains
        #: service -> its chain (None: the default chain); set once the chain is usable
        self._chains: dict[str, CompiledChain | None] = {}
        #: target -> latest snapshot of its instances (replaced, never mutated)
        self._target_snapshots: dict[TargetKey, Snapshot] = {}
        self._target_first: dict[TargetKey, asyncio.Event] = {}  # discovery thread only
        self._target_listeners: tuple[Callable[[TargetKey, Snapshot], None], ...] = ()
        self._lock = threading.Lock()  # starting watches, subscribing, closing; never I/O
        self._changed = threading.Condition()  # wakes wait() on new snapshots / catalog
        self._closed = False
        #: loop time the current outage was noticed, or None (discovery thread only)
        self._outage_since: float | None = None

        tls = settings.address.startswith("https://")
        headers = {"X-Consul-Token": settings.token} if settings.token else {}
        self._extensions: dict[str, Any] = (
            {"sni_hostname": settings.tls_server_name} if tls and settings.tls_server_name else {}
        )
        #: how each watch builds its own one-connection client (module docstring)
        self._client_options: dict[str, Any] = {
            "base_url": settings.address,
            "headers": headers,
            # Built once and shared: each client would otherwise build its own context. Plain
            # http never uses it.
            "verify": _ssl_context(settings) if tls else _UNUSED_TLS,
            "timeout": httpx.Timeout(10.0, read=wait + wait / 16 + 10.0),
            "limits": httpx.Limits(max_connections=1, max_keepalive_connections=1),
        }
        self._slots = _Slots(_MAX_CONNECTIONS)
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = _InlineResolvingLoop()
        self._thread = threading.Thread(
            target=self._run, name="meshlib-consul-discovery", daemon=True
        )
        self._thread.start()

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
            return True  # the catalog watch may simply not have caught up yet
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
        if services is None:  # an empty health answer alone cannot tell "none healthy"
            return False, snapshot  # from "no such service": the catalog can
        if service not in services:
            return True, None
        return snapshot is not None, snapshot

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
            with suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._watch_target, key)
        return snapshot

    def subscribe_targets(self, listener: Callable[[TargetKey, Snapshot], None]) -> None:
        """Call ``listener(key, snapshot)`` on the discovery thread for each target answer."""
        with self._lock:
            self._target_listeners = (*self._target_listeners, listener)

    def subscribe(self, listener: SnapshotListener) -> None:
        """Call ``listener(snapshot)`` on the discovery thread for every new snapshot.

        A listener that raises is logged and stays subscribed; it cannot stop the watches.
        """
        with self._lock:
            self._listeners = (*self._listeners, listener)

    def close(self) -> None:
        """Stop every watch and the discovery thread and close the HTTP client. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._stopping.set)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)
            if self._thread.is_alive():
                logger.warning("the Consul discovery thread did not stop within 10 s")
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
            with suppress(RuntimeError):  # the loop died; nothing will ever answer
                self._loop.call_soon_threadsafe(self._spawn, self._watch_health(service))
                if self._chains_on:
                    self._loop.call_soon_threadsafe(self._spawn, self._watch_chain(service))

    def watch(
        self,
        path: str,
        answer: Callable[[Any, int], None],
        params: Mapping[str, str] | None = None,
        *,
        missing_ok: bool = False,
        refused: Callable[[str], None] | None = None,
    ) -> None:
        """Keep a blocking query on ``path`` going on the discovery thread.

        ``answer(body, index)`` runs on that thread with each answer; raising from it counts
        as a bad answer (retried with backoff, the last good state kept). Used for Consul
        Connect's CA roots and leaf (security/_consul_ca.py) and config entries. With
        ``missing_ok`` a 404 (a config entry that does not exist) answers ``None``. An ACL
        refusal (403) is logged once per distinct text, or handed to ``refused(line)``.
        """
        loop = self._blocking_loop(path, dict(params or {}), answer, missing_ok, refused=refused)
        with suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._spawn, loop)

    # ------------------------------------------------------------------ the discovery thread

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _main(self) -> None:
        self._spawn(self._watch_catalog())
        try:
            await self._stopping.wait()
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._stopping.is_set():
            coroutine.close()
            return
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a Consul watch stopped", exc_info=task.exception())

    async def _watch_health(self, service: str) -> None:
        last: object = None

        def answer(body: Any, index: int) -> None:
            nonlocal last
            healthy, unhealthy = _endpoints(body)
            fingerprint = _fingerprint(healthy, unhealthy)
            if fingerprint == last:
                return
            last = fingerprint
            logger.debug(
                "service %s: %d healthy endpoints, %d unhealthy",
                service,
                len(healthy),
                len(unhealthy),
            )
            self._publish(Snapshot(service, healthy, index, unhealthy))

        # Every instance, not only ?passing ones: the unhealthy are kept for panic mode.
        await self._blocking_loop(self._health_path + quote(service, safe=""), {}, answer)

    async def _watch_chain(self, service: str) -> None:
        latest = 0  # the newest answer; an older one still waiting for targets is dropped
        refused: str | None = None

        def answer(body: Any, index: int) -> None:
            nonlocal latest, refused
            try:
                chain = compile_chain(body)
            except ValueError as exc:
                # Consul answered, so this is no outage: keep the last good chain, say so once
                # per distinct problem, and block until the entries change again.
                if str(exc) != refused:
                    refused = str(exc)
                    logger.error(
                        "the discovery chain of %r is refused (%s); keeping the last good chain",
                        service,
                        exc,
                    )
                self._chain_settled(service)
                return
            refused = None
            latest += 1
            self._spawn(self._publish_chain(service, chain, latest, lambda: latest))

        failing = False

        def failed(reason: str) -> None:
            # Consul answers 500 when Connect is disabled on its servers (discovery chains
            # need it): route without chains rather than hold first requests or call it an
            # outage; the health watches report a real one.
            nonlocal failing
            if not failing:
                failing = True
                logger.warning(
                    "the discovery chain of %r is unavailable (%s); routing without it",
                    service,
                    reason,
                )
            self._chain_settled(service)

        def usable(body: Any, index: int) -> None:
            nonlocal failing
            if failing:
                failing = False
                logger.info("the discovery chain of %r is available again", service)
            answer(body, index)

        path = "/v1/discovery-chain/" + quote(service, safe="")
        await self._blocking_loop(path, {}, usable, failed=failed)

    async def _publish_chain(
        self,
        service: str,
        chain: CompiledChain | None,
        number: int,
        latest: Callable[[], int],
    ) -> None:
        if chain is not None:
            events = [self._watch_target(key) for key in _target_keys(chain)]
            waiting = [e.wait() for e in events if not e.is_set()]
            if waiting:  # bounded: a target that never answers must not freeze routing
                with suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*waiting), timeout=10.0)
        if number != latest():
            return  # a newer chain arrived meanwhile
        if service not in self._chains or self._chains[service] != chain:
            logger.debug("service %s: new discovery chain", service)
        self._chains[service] = chain  # one assignment: requests read it without a lock
        self._chain_settled(service)

    def _chain_settled(self, service: str) -> None:
        if service not in self._chains:
            self._chains[service] = None
        with self._changed:
            self._changed.notify_all()

    def _watch_target(self, key: TargetKey) -> asyncio.Event:
        """Start watching ``key``'s instances (discovery thread); its first-answer event."""
        event = self._target_first.get(key)
        if event is not None:
            return event
        event = self._target_first[key] = asyncio.Event()
        service, expression, datacenter = key
        params = {}
        if expression:
            params["filter"] = expression  # Consul evaluates the subset, as for Envoy
        if datacenter:
            params["dc"] = datacenter
        where = f" in {datacenter}" if datacenter else ""
        where += f" matching {expression!r}" if expression else ""
        last: object = None
        failing = False

        def answer(body: Any, index: int) -> None:
            nonlocal last, failing
            healthy, unhealthy = _endpoints(body)
            if failing:
                failing = False
                logger.info("instances of %s%s are answered again", service, where)
            fingerprint = _fingerprint(healthy, unhealthy)
            if fingerprint != last:
                last = fingerprint
                snapshot = Snapshot(service, healthy, index, unhealthy)
                self._target_snapshots[key] = snapshot
                for listener in self._target_listeners:
                    try:
                        listener(key, snapshot)
                    except Exception:
                        logger.exception("target listener %r failed", listener)
            event.set()

        def failed(reason: str) -> None:
            nonlocal failing
            if not failing:  # once per failure streak, not per retry
                failing = True
                logger.warning("instances of %s%s unavailable: %s", service, where, reason)
            # A target that cannot answer (another datacenter out of reach) counts as
            # answered: it is empty, and a chain waiting for it must not wait longer.
            event.set()

        path = self._health_path + quote(service, safe="")
        self._spawn(self._blocking_loop(path, params, answer, failed=failed))
        return event

    async def _watch_catalog(self) -> None:
        def answer(body: Any, index: int) -> None:
            if not isinstance(body, dict) or not all(isinstance(name, str) for name in body):
                raise _BadAnswer("the catalog is not a JSON object of service names")
            services = frozenset(body)
            if services != self._services:
                self._services = services
                with self._changed:
                    self._changed.notify_all()

        await self._blocking_loop("/v1/catalog/services", {}, answer)

    async def _blocking_loop(
        self,
        path: str,
        params: Mapping[str, str],
        answer: Callable[[Any, int], None],
        missing_ok: bool = False,
        failed: Callable[[str], None] | None = None,
        refused: Callable[[str], None] | None = None,
    ) -> None:
        """Query ``path`` forever, following Consul's blocking-query rules (module docstring).

        ``failed(reason)``, if given, is called instead of the outage log after each query
        that brought no usable answer, and that watch's answers say nothing about an outage:
        for a query another datacenter answers, whose failure says nothing about the agent.
        """
        loop = asyncio.get_running_loop()
        index = 0
        failures = 0
        not_before = 0.0
        client: httpx.AsyncClient | None = None  # this watch's connection, while it has a slot
        said = ""  # the ACL refusal last said by this watch
        try:
            while True:
                delay = not_before - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # the rate limit: one query per min_interval
                if client is None:
                    await self._slots.acquire()
                    client = httpx.AsyncClient(**self._client_options)
                sent = loop.time()
                not_before = sent + self._min_interval
                try:
                    body, new_index = await self._get(client, path, params, index, missing_ok)
                    answer(body, new_index)
                except Exception as exc:  # any failure: keep the last snapshot and retry
                    failures += 1
                    index = 0
                    if failed is None and isinstance(exc, _Refused):
                        if str(exc) != said:  # a policy, not an outage: once per change
                            said = str(exc)
                            if refused is not None:
                                refused(said)
                            else:
                                logger.error("cannot read %s from Consul: %s", path, exc)
                    elif failed is None:
                        self._failed(_reason(exc), loop.time())
                    else:
                        failed(_reason(exc))
                    base = max(self._min_interval, 0.05)
                    cap = min(self._max_backoff, base * 2 ** min(failures, 32))
                    backoff = random.uniform(0, cap)  # full jitter
                    logger.debug("%s failed (%s); retrying in %.2f s", path, _reason(exc), backoff)
                    await self._hang_up(client)  # no slot is held through a backoff
                    client = None
                    await asyncio.sleep(backoff)
                    continue
                failures = 0
                if said:
                    said = ""
                    logger.info("%s is readable again", path)
                if failed is None:
                    self._recovered(sent)
                index = _next_index(index, new_index)
                if self._slots.wanted:  # more watches than slots: take turns, one query each
                    await self._hang_up(client)
                    client = None
        finally:
            if client is not None:
                await self._hang_up(client)

    async def _hang_up(self, client: httpx.AsyncClient) -> None:
        """Close a watch's connection and give its slot to the next watch waiting."""
        self._slots.release()  # first: a cancelled close must not keep the slot
        await client.aclose()

    async def _get(
        self,
        client: httpx.AsyncClient,
        path: str,
        params: Mapping[str, str],
        index: int,
        missing_ok: bool = False,
    ) -> tuple[Any, int]:
        query = dict(params)
        if index > 0:
            query.update(index=str(index), wait=f"{self._wait_ms}ms")
        response = await client.get(path, params=query, extensions=self._extensions)
        missing = missing_ok and response.status_code == 404
        refused = refusal(response.status_code, response.text)
        if refused is not None:
            raise _Refused(refused)
        if path == "/v1/catalog/services":
            self.catalog_filtered = response.headers.get(FILTERED_HEADER) == "true"
        if response.status_code != 200 and not missing:
            text = " ".join(response.text.split())[:200]
            raise _BadAnswer(f"HTTP {response.status_code} {text}".rstrip())
        header = response.headers.get("X-Consul-Index")
        try:
            new_index = int(header or "")
        except ValueError:
            raise _BadAnswer(f"X-Consul-Index {header!r} is not a number") from None
        if missing:
            return None, new_index
        try:
            body = response.json()
        except ValueError as exc:
            raise _BadAnswer(f"malformed JSON ({exc})") from None
        return body, new_index

    def _publish(self, snapshot: Snapshot) -> None:
        self._snapshots[snapshot.service] = snapshot  # one assignment: readers take no lock
        with self._changed:
            self._changed.notify_all()
        for listener in self._listeners:
            try:
                listener(snapshot)
            except Exception:
                logger.exception("snapshot listener %r failed", listener)

    def _failed(self, reason: str, now: float) -> None:
        if self._outage_since is None:
            self._outage_since = now
            logger.warning(
                "Consul at %s unreachable: %s; serving the last known endpoints",
                self._address,
                reason,
            )

    def _recovered(self, sent: float) -> None:
        # Only an answer to a query sent after the outage began proves Consul is back: an
        # agent shutting down still answers some blocking queries already in flight (200 for
        # /v1/catalog/services, 500 for others), which would otherwise log "back" then
        # "unreachable" again within milliseconds.
        if self._outage_since is not None and sent >= self._outage_since:
            self._outage_since = None
            logger.info("Consul at %s is reachable again", self._address)


# ---------------------------------------------------------------------- answers


def _next_index(last: int, new: int) -> int:
    """The index for the next blocking query after an answer carrying ``new``."""
    if new < last:
        return 0  # went backwards: restart the loop with a query that answers at once
    if new <= 0:
        return 1  # never block on 0: it would answer at once, every time
    return new


def _endpoints(body: Any) -> tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]:
    """The (healthy, unhealthy) endpoints in a ``/v1/health/service`` answer, each sorted.

    Healthy means every check of the instance and of its node passes: what ``?passing``
    selects. _BadAnswer if the answer is malformed.
    """
    if not isinstance(body, list):
        raise _BadAnswer("the health answer is not a JSON list")
    healthy: list[Endpoint] = []
    unhealthy: list[Endpoint] = []
    for entry in body:
        if not isinstance(entry, dict):
            raise _BadAnswer("a health entry is not a JSON object")
        service, node = entry.get("Service"), entry.get("Node")
        if not isinstance(service, dict) or not isinstance(node, dict):
            raise _BadAnswer("a health entry lacks its Service or Node object")
        port = _int(service.get("Port"))
        if port is None or not 0 <= port < 65536:
            raise _BadAnswer(f"Service.Port {service.get('Port')!r} is not a port number")
        if port == 0:
            continue  # registered without a port (a socket path, say): nothing to dial
        host = service.get("Address") or node.get("Address")
        if not isinstance(host, str) or not host:
            raise _BadAnswer("a health entry has neither Service.Address nor Node.Address")
        weights = service.get("Weights")
        passing = _int(weights.get("Passing")) if isinstance(weights, dict) else None
        (healthy if _passing(entry.get("Checks")) else unhealthy).append(
            Endpoint(
                host=host,
                port=port,
                weight=1 if passing is None else max(1, passing),
                id=_text(service.get("ID"), "Service.ID"),
                node=_text(node.get("Node"), "Node.Node"),
                meta=_meta(service.get("Meta")),
                tags=_tags(service.get("Tags")),
            )
        )
    healthy.sort(key=_order)
    unhealthy.sort(key=_order)
    return tuple(healthy), tuple(unhealthy)


def _order(endpoint: Endpoint) -> tuple[str, str, str, int]:
    return endpoint.node, endpoint.id, endpoint.host, endpoint.port


def _passing(checks: object) -> bool:
    """Whether every check in a health entry's ``Checks`` passes (none: it passes)."""
    if checks is None:
        return True
    if not isinstance(checks, list) or not all(isinstance(c, dict) for c in checks):
        raise _BadAnswer("Checks is not a list of objects")
    return all(check.get("Status") == "passing" for check in checks)


def _target_keys(chain: CompiledChain) -> set[TargetKey]:
    """The targets of ``chain`` (failover included) that need their own health watch:
    subsets, other datacenters and other services (the chain's own service is watched)."""
    return {
        (t.service, t.filter, t.datacenter)
        for t in chain.targets()
        if t.filter or t.datacenter or t.service != chain.service
    }


def _fingerprint(healthy: tuple[Endpoint, ...], unhealthy: tuple[Endpoint, ...]) -> object:
    """What makes two answers different news (a check's output alone is not)."""
    # Endpoint's own equality ignores meta and tags; a change in either is still news.
    return tuple(
        tuple(
            (e.host, e.port, e.weight, e.id, e.node, tuple(sorted(e.meta.items())), e.tags)
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
        raise _BadAnswer(f"{field} {value!r} is not a string")
    return value


def _meta(value: object) -> Mapping[str, str]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _BadAnswer("Service.Meta is not an object of strings")
    return MappingProxyType(dict(value))


def _tags(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(tag, str) for tag in value):
        raise _BadAnswer("Service.Tags is not a list of strings")
    return tuple(value)


def _reason(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, _BadAnswer):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------- plumbing


class _Slots:
    """At most ``limit`` watches hold a connection to the agent at once (discovery thread).

    A watch takes a slot before its query and keeps it, with its keep-alive connection,
    while nobody waits. When watches outnumber slots, each hangs up after every answer, so
    they take turns: a waiting watch sees changes late, never not at all.
    """

    def __init__(self, limit: int) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self._waiting = 0

    async def acquire(self) -> None:
        """Wait for a free slot."""
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1

    def release(self) -> None:
        """Give a slot back."""
        self._semaphore.release()

    @property
    def wanted(self) -> bool:
        """Whether a watch is waiting for a slot."""
        return self._waiting > 0


_UNUSED_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _ssl_context(settings: ConsulSettings) -> ssl.SSLContext:
    """The TLS context for an https agent address, built once (FINDINGS: ``verify=ctx``)."""
    context = ssl.create_default_context(cafile=settings.cacert)
    if settings.client_cert:
        context.load_cert_chain(settings.client_cert, settings.client_key)
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _InlineResolvingLoop(asyncio.SelectorEventLoop):
    """An event loop that resolves host names on its own thread.

    asyncio runs ``getaddrinfo`` in its default thread pool, which starts up to
    ``min(32, cpus + 4)`` threads when many watches connect at once; discovery promises one
    thread. Only the agent's own address is ever resolved, once per new connection, and
    IP literals are not resolved at all.
    """

    async def getaddrinfo(
        self,
        host: bytes | str | None,
        port: bytes | str | int | None,
        *,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:
        return socket.getaddrinfo(host, port, family, type, proto, flags)
