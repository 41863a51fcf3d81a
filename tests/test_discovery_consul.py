"""ConsulDiscovery against a real Consul agent, and against a fake one that answers garbage.

The real agent proves the blocking queries, health filtering, weights and the outage and
restart behaviour (those tests are marked ``consul``); the fake (a tiny HTTP server)
produces what a real agent will not on demand: malformed JSON, wrong shapes, an index that
goes backwards. The fake needs no Consul, so those tests run everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import NameOID

from consul_agent import ConsulAgent, ConsulFactory, register, set_checks, unique
from meshlib._config import ConsulSettings
from meshlib.consul import Engine
from meshlib.discovery import ConsulDiscovery, Endpoint, Snapshot
from polling import wait_until

LOGGER = "meshlib.discovery"

DiscoveryFactory = Callable[..., ConsulDiscovery]


@pytest.fixture
def make_discovery() -> Iterator[DiscoveryFactory]:
    """ConsulDiscovery with short knobs; every one is closed after the test."""
    made: list[ConsulDiscovery] = []

    def make(where: str | ConsulSettings, **options: Any) -> ConsulDiscovery:
        token = options.pop("token", None)
        settings = (
            where if isinstance(where, ConsulSettings) else ConsulSettings(where, token=token)
        )
        options = {"wait": 10.0, "min_interval": 0.01, "max_backoff": 0.1, **options}
        discovery = ConsulDiscovery(settings, **options)
        made.append(discovery)
        return discovery

    yield make
    for discovery in made:
        discovery.close()


def ids_of(discovery: ConsulDiscovery, service: str) -> set[str] | None:
    snapshot = discovery.snapshot(service)
    return None if snapshot is None else {e.id for e in snapshot.endpoints}


# ---------------------------------------------------------------------- against real Consul


@pytest.mark.consul
def test_passing_instances_appear_and_a_failed_one_drops_within_a_second(
    consul: ConsulAgent, registered: list[str], make_discovery: DiscoveryFactory
) -> None:
    name = unique("web")
    register(consul, name, f"{name}-a", 9001, ids=registered)
    register(consul, name, f"{name}-b", 9002, ids=registered)
    discovery = make_discovery(consul.url)

    assert discovery.wait(name, timeout=5.0) is not None
    wait_until(lambda: ids_of(discovery, name) == {f"{name}-a", f"{name}-b"}, what="both")

    consul.put(f"/v1/agent/check/fail/service:{name}-b")

    wait_until(lambda: ids_of(discovery, name) == {f"{name}-a"}, timeout=1.0, what="b dropped")


@pytest.mark.consul
def test_endpoint_fields_come_from_the_health_answer(
    consul: ConsulAgent, registered: list[str], make_discovery: DiscoveryFactory
) -> None:
    name = unique("api")
    register(
        consul,
        name,
        f"{name}-heavy",
        9001,
        ids=registered,
        Address="127.0.0.9",
        Weights={"Passing": 5, "Warning": 1},
        Meta={"version": "v2"},
        Tags=["canary", "blue"],
    )
    # No service address: the node's address (the agent's, 127.0.0.1) stands in for it.
    # No weights: 1.
    register(consul, name, f"{name}-plain", 9002, ids=registered, Address="")
    discovery = make_discovery(consul.url)

    wait_until(lambda: ids_of(discovery, name) == {f"{name}-heavy", f"{name}-plain"})
    snapshot = discovery.snapshot(name)

    assert snapshot is not None
    by_id = {e.id: e for e in snapshot.endpoints}
    heavy, plain = by_id[f"{name}-heavy"], by_id[f"{name}-plain"]
    assert (heavy.host, heavy.port, heavy.weight, heavy.node) == (
        "127.0.0.9",
        9001,
        5,
        consul.node_name,
    )
    assert dict(heavy.meta) == {"version": "v2"}
    assert heavy.tags == ("canary", "blue")
    assert (plain.host, plain.port, plain.weight) == ("127.0.0.1", 9002, 1)
    assert snapshot.index > 0


@pytest.mark.consul
def test_check_statuses_and_weights_make_health_as_consul_tells_envoy(
    consul: ConsulAgent, registered: list[str], make_discovery: DiscoveryFactory
) -> None:
    """Consul's calculateEndpointHealthAndWeight (agent/xds/endpoints.go), OnlyPassing false."""
    name = unique("api")
    weights = {
        "pass": {"Passing": 3, "Warning": 1},
        "warn": {"Passing": 3, "Warning": 2},
        "warn0": {"Passing": 1, "Warning": 0},
        "crit": {"Passing": 1, "Warning": 1},
        "big": {"Passing": 500, "Warning": 1},
        "flip": {"Passing": 1, "Warning": 1},
    }
    for port, (suffix, weight) in enumerate(weights.items(), start=9001):
        register(consul, name, f"{name}-{suffix}", port, ids=registered, Weights=weight)
    set_checks(
        consul,
        name,
        {f"service:{name}-{s}": "warning" for s in ("warn", "warn0")}
        | {f"service:{name}-crit": "critical"},
    )
    discovery = make_discovery(consul.url)

    def seen() -> tuple[dict[str, tuple[int, bool]], dict[str, tuple[int, bool]]] | None:
        snapshot = discovery.snapshot(name)
        if snapshot is None:
            return None
        short = len(name) + 1
        return (
            {e.id[short:]: (e.weight, e.warning) for e in snapshot.endpoints},
            {e.id[short:]: (e.weight, e.warning) for e in snapshot.unhealthy},
        )

    healthy = {"pass": (3, False), "warn": (2, True), "big": (128, False), "flip": (1, False)}
    unhealthy = {"warn0": (1, True), "crit": (1, False)}
    wait_until(lambda: seen() == (healthy, unhealthy), what="health as Consul computes it")
    snapshot = discovery.snapshot(name)
    assert snapshot is not None
    passing_only = snapshot.only_passing()  # a subset with OnlyPassing
    assert {e.id for e in passing_only.endpoints} == {
        f"{name}-{s}" for s in ("pass", "big", "flip")
    }
    assert {e.id for e in passing_only.unhealthy} == {
        f"{name}-{s}" for s in ("warn0", "crit", "warn")
    }

    # a check that starts warning changes neither weight nor health here, yet it is news:
    # a subset with OnlyPassing must hear of it
    set_checks(consul, name, {f"service:{name}-flip": "warning"})
    wait_until(lambda: seen() == (healthy | {"flip": (1, True)}, unhealthy), what="flip warns")


@pytest.mark.consul
def test_knows_answers_from_the_catalog(
    consul: ConsulAgent, registered: list[str], make_discovery: DiscoveryFactory
) -> None:
    name = unique("known")
    register(consul, name, f"{name}-1", 9001, ids=registered)
    discovery = make_discovery(consul.url)

    assert wait_until(lambda: discovery.knows(name), what="knows() True") is True
    assert discovery.knows(unique("never-registered")) is False


@pytest.mark.consul
def test_wait_for_a_service_that_does_not_exist_returns_fast(
    consul: ConsulAgent, make_discovery: DiscoveryFactory
) -> None:
    discovery = make_discovery(consul.url)

    started = time.monotonic()
    result = discovery.wait(unique("nowhere"), timeout=10.0)

    assert result is None
    assert time.monotonic() - started < 1.0


@pytest.mark.consul
def test_wait_for_a_service_without_healthy_instances_returns_an_empty_snapshot(
    consul: ConsulAgent, registered: list[str], make_discovery: DiscoveryFactory
) -> None:
    name = unique("sick")
    check = {"TTL": "60s", "Status": "critical"}
    register(consul, name, f"{name}-1", 9001, ids=registered, Check=check)
    discovery = make_discovery(consul.url)

    snapshot = discovery.wait(name, timeout=5.0)

    assert snapshot is not None
    assert snapshot.endpoints == ()
    assert [e.id for e in snapshot.unhealthy] == [f"{name}-1"]  # kept for panic mode
    assert discovery.knows(name) is True


@pytest.mark.consul
def test_one_thread_watches_fifty_services(
    consul: ConsulAgent, make_discovery: DiscoveryFactory
) -> None:
    before = threading.active_count()
    # A host name, not an IP: resolving it must not start resolver threads either.
    discovery = make_discovery(f"http://localhost:{consul.http_port}")
    names = [unique(f"many{i}") for i in range(50)]

    for name in names:  # unknown to Consul: answered as such (empty), or not yet
        assert not getattr(discovery.snapshot(name), "endpoints", None)
    wait_until(lambda: all(discovery.snapshot(n) is not None for n in names), what="50 answers")

    assert threading.active_count() - before == 1
    discovery.close()
    assert threading.active_count() == before


@pytest.mark.consul
def test_three_hundred_services_on_five_connections_and_twenty_changes_all_seen(
    consul: ConsulAgent, registered: list[str], make_discovery: DiscoveryFactory
) -> None:
    """Watches once took turns past ~75 services; now the datacenter is one query."""
    names = [unique(f"scale{i}") for i in range(300)]
    for name in names:
        consul.put(
            "/v1/agent/service/register",
            {"Name": name, "ID": f"{name}-1", "Port": 9001, "Check": PASSING_TTL},
        )
        registered.append(f"{name}-1")
    before = threading.active_count()
    discovery = make_discovery(consul.url, chains=True)
    started = time.monotonic()
    for name in names:  # every first call answers (none waits for a turn)
        assert discovery.wait(name, timeout=5.0) is not None, name
    first_answers = time.monotonic() - started
    changed = names[::15]  # 20 of them
    at = time.monotonic()
    for name in changed:
        consul.put(
            "/v1/agent/service/register",
            {"Name": name, "ID": f"{name}-2", "Port": 9002, "Check": PASSING_TTL},
        )
        registered.append(f"{name}-2")
    wait_until(
        lambda: all(ids_of(discovery, n) == {f"{n}-1", f"{n}-2"} for n in changed),
        timeout=10,
        what="the 20 changes",
    )
    seen_after = time.monotonic() - at
    assert threading.active_count() - before == 1
    connections = agent_connections(consul)
    assert connections <= 5, connections
    print(f"300 services: first answers {first_answers:.2f}s; 20 changes seen {seen_after:.2f}s")


PASSING_TTL = {"TTL": "600s", "Status": "passing"}


def agent_connections(agent: ConsulAgent) -> int:
    """This process's established TCP connections to the agent's HTTP port."""
    port = f"{agent.http_port:04X}"
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[2].endswith(":" + port) and fields[3] == "01":  # ESTABLISHED
                    count += 1
    return count


@pytest.mark.consul
def test_outage_keeps_the_last_snapshot_and_warns_once_then_restart_is_picked_up(
    consul_factory: ConsulFactory,
    make_discovery: DiscoveryFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    agent = consul_factory()
    register(agent, "shop", "shop-1", 9001)
    # A long wait: after the restart a stale index would hide the new instance for 30 s.
    discovery = make_discovery(agent.url, wait=30.0, token="s3cret-token")
    discovery.snapshot("catalog-watch-too")
    wait_until(lambda: ids_of(discovery, "shop") == {"shop-1"})
    before = discovery.snapshot("shop")

    agent.stop()

    wait_until(lambda: len(retries(caplog)) >= 6, what="several failed retries")
    assert discovery.snapshot("shop") is before
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].getMessage().startswith(f"Consul at {agent.url} unreachable: ")
    assert warnings[0].getMessage().endswith("; serving the last known endpoints")

    agent.restart()  # dev mode: comes back empty, its index far below the last one seen
    register(agent, "shop", "shop-2", 9002)

    wait_until(lambda: ids_of(discovery, "shop") == {"shop-2"}, timeout=10.0, what="shop-2")
    infos = wait_until(lambda: messages(caplog, logging.INFO), what="the recovery logged")
    assert infos[0] == f"Consul at {agent.url} is reachable again"
    # The agent came back empty. If discovery asked before shop-2 was registered, shop kept
    # shop-1 until shop-2 appeared, said once each (test_consul_restarts covers it fully).
    kept = messages(caplog, logging.WARNING)[1:]
    assert kept in (
        [],
        [
            "Consul came back without any instance of 'shop'; keeping its 1 last known "
            "instances for up to 30s, until some reappear"
        ],
    )
    if kept:
        wait_until(lambda: len(messages(caplog, logging.INFO)) == 2, what="the grace ended")
        assert messages(caplog, logging.INFO)[1] == (
            "instances of 'shop' are known again after the reset"
        )
    assert "s3cret-token" not in caplog.text


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def retries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "retrying in" in r.getMessage()]


# ---------------------------------------------------------------------- against a fake


@dataclass
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    answered_index: str | None = None  # None while it is still blocked


class FakeConsul:
    """A tiny Consul impostor: answers what the test sets, blocking like the real one.

    A query carrying ``index`` blocks until the test sets a new answer for that path (or
    ``wait`` passes, at most 2 s), as Consul's blocking queries do. ``requests`` records each
    query's path, parameters, headers and the ``X-Consul-Index`` it was answered with.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._answers: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self._generation: dict[str, int] = {}
        self._served: dict[str, int] = {}
        self._came_back: set[tuple[str, int]] = set()
        self._cond = threading.Condition()
        self._closing = False
        #: every request in order: path, query, headers, the index it was answered with
        self.requests: list[Request] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Consul's own server

            def do_GET(self) -> None:
                fake._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def set(self, path: str, body: bytes, *, index: str | None, status: int = 200) -> None:
        headers = {"Content-Type": "application/json"}
        if index is not None:
            headers["X-Consul-Index"] = index
        with self._cond:
            self._answers[path] = (status, headers, body)
            self._generation[path] = self._generation.get(path, 0) + 1
            self._cond.notify_all()

    def set_json(self, path: str, value: Any, *, index: int) -> None:
        self.set(path, json.dumps(value).encode(), index=str(index))

    def handled(self, path: str) -> None:
        """Wait until the client has handled the current answer: it came back for more.

        One watch asks one query at a time, so a new query means the last answer is done.
        """
        with self._cond:
            key = (path, self._generation[path])
        wait_until(lambda: key in self._came_back, what=f"the client to handle {key}")

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        request = Request(path, query, dict(handler.headers))
        with self._cond:
            self.requests.append(request)
            generation = self._generation.get(path, 0)
            if self._served.get(path) == generation:
                self._came_back.add((path, generation))
                if "index" in query:
                    wait = min(2.0, float(query.get("wait", "2000ms").removesuffix("ms")) / 1000)
                    self._cond.wait_for(
                        lambda: self._closing or self._generation.get(path) != generation,
                        timeout=wait,
                    )
            status, headers, body = self._answers.get(path, (404, {}, b"not found"))
            self._served[path] = self._generation.get(path, 0)
            request.answered_index = headers.get("X-Consul-Index")
        try:
            handler.send_response(status)
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client closed its blocking query: fine

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def fake() -> Iterator[FakeConsul]:
    server = FakeConsul()
    yield server
    server.close()


def entry(service_id: str, port: object, **service: Any) -> dict[str, Any]:
    """An instance of ``svc`` as the node dump lists it."""
    return {"ID": service_id, "Service": "svc", "Address": "", "Port": port, **service}


def dump(*services: dict[str, Any]) -> list[dict[str, Any]]:
    """``/v1/internal/ui/nodes``: one node holding ``services``, no checks."""
    return [{"Node": "node-1", "Address": "10.0.0.1", "Services": list(services), "Checks": []}]


DUMP = "/v1/internal/ui/nodes"


def test_garbage_answers_keep_the_last_good_snapshot(
    fake: FakeConsul, make_discovery: DiscoveryFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    fake.set_json(DUMP, dump(entry("a", 8001)), index=10)
    discovery = make_discovery(fake.url)
    good = wait_until(lambda: discovery.wait("svc", 5.0), what="first snapshot")
    assert good == Snapshot("svc", (Endpoint("10.0.0.1", 8001, 1, id="a", node="node-1"),), 10)

    # answers the watch cannot use at all: an outage, warned once
    unusable: list[tuple[bytes, str | None, int]] = [
        (b"{not json", "11", 200),
        (b'{"Services": []}', "12", 200),  # an object, not a list
        (b"[1, 2]", "13", 200),
        (json.dumps([{"Node": "n", "Services": {"x": 1}}]).encode(), "14", 200),
        (json.dumps(dump(entry("a", 8001))).encode(), "not-a-number", 200),
        (json.dumps(dump(entry("a", 8001))).encode(), None, 200),  # no index at all
        (b"rpc error: No cluster leader", "17", 500),
        (b"\xff\xfe", "18", 200),
    ]
    for body, index, status in unusable:
        fake.set(DUMP, body, index=index, status=status)
        fake.handled(DUMP)
        assert discovery.snapshot("svc") is good, body
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert "malformed JSON" in warnings[0]

    # a dump Consul answered whose instances of svc are malformed: svc keeps its last good
    # instances, said once per distinct problem
    for number, instance in enumerate([entry("a", "8001"), entry("a", 8001, Meta=["x"])], 19):
        fake.set_json(DUMP, dump(instance), index=number)
        fake.handled(DUMP)
        assert discovery.snapshot("svc") is good, instance
    refused = messages(caplog, logging.ERROR)
    assert len(refused) == 2
    assert all("instances of 'svc' refused" in m for m in refused)

    fake.set_json(DUMP, dump(entry("a", 8001), entry("b", 8002)), index=22)
    wait_until(lambda: ids_of(discovery, "svc") == {"a", "b"}, what="recovery")
    assert discovery.snapshot("svc").index == 22  # type: ignore[union-attr]
    infos = wait_until(lambda: messages(caplog, logging.INFO), what="the recovery logged")
    assert infos == [f"Consul at {fake.url} is reachable again"]


def test_index_going_backwards_resets_to_zero(
    fake: FakeConsul, make_discovery: DiscoveryFactory
) -> None:
    fake.set_json(DUMP, dump(entry("a", 8001)), index=100)
    discovery = make_discovery(fake.url)
    wait_until(lambda: discovery.snapshot("svc"), what="first snapshot")
    fake.handled(DUMP)

    fake.set_json(DUMP, dump(entry("a", 8001)), index=5)
    fake.handled(DUMP)
    fake.set_json(DUMP, dump(entry("a", 8001), entry("b", 8002)), index=6)

    wait_until(lambda: ids_of(discovery, "svc") == {"a", "b"}, what="updates after the reset")
    # (index sent, index answered): it blocked on 100; when 5 came back it asked afresh
    # (no index: answers at once), then blocked on 5 until 6 arrived.
    exchanges = [(r.query.get("index"), r.answered_index) for r in health_requests(fake)]
    assert exchanges[:4] == [(None, "100"), ("100", "5"), (None, "5"), ("5", "6")], exchanges


def test_index_zero_is_never_blocked_on(fake: FakeConsul, make_discovery: DiscoveryFactory) -> None:
    fake.set_json(DUMP, dump(entry("a", 8001)), index=0)
    discovery = make_discovery(fake.url)
    wait_until(lambda: discovery.snapshot("svc"), what="first snapshot")

    fake.handled(DUMP)

    assert [r.query.get("index") for r in health_requests(fake)] == [None, "1"]


def health_requests(fake: FakeConsul) -> list[Request]:
    return [r for r in list(fake.requests) if r.path == DUMP]


def test_snapshots_are_published_only_on_change(
    fake: FakeConsul, make_discovery: DiscoveryFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fake.set_json(DUMP, dump(entry("a", 8001)), index=10)
    discovery = make_discovery(fake.url)
    seen: list[Snapshot] = []

    def broken_listener(snapshot: Snapshot) -> None:
        raise RuntimeError("listener bug")

    discovery.subscribe(broken_listener)
    discovery.subscribe(seen.append)
    assert discovery.snapshot("svc") is None  # the first mention starts the watch
    wait_until(lambda: seen, what="first snapshot")

    steps: list[tuple[list[dict[str, Any]], bool]] = [
        ([entry("a", 8001)], False),  # a new index, nothing else: not news
        ([entry("a", 8001, Meta={"version": "v2"})], True),
        ([entry("a", 8001, Meta={"version": "v2"}, Tags=["x"])], True),
        ([entry("a", 8001, Meta={"version": "v2"}, Tags=["x"], Weights={"Passing": 3})], True),
        ([entry("a", 8001, Meta={"version": "v2"}, Tags=["x"], Weights={"Passing": 3})], False),
    ]
    for number, (body, news) in enumerate(steps, start=11):
        count = len(seen)
        fake.set_json(DUMP, dump(*body), index=number)
        fake.handled(DUMP)
        assert len(seen) == count + news, body

    assert [s.index for s in seen] == [10, 12, 13, 14]
    assert seen[-1].endpoints[0].weight == 3
    failures = [r for r in caplog.records if "listener" in r.getMessage()]
    assert len(failures) == len(seen)
    assert all(r.exc_info is not None for r in failures)


def test_token_is_sent_as_a_header(fake: FakeConsul, make_discovery: DiscoveryFactory) -> None:
    fake.set_json(DUMP, dump(entry("a", 8001)), index=3)
    discovery = make_discovery(fake.url, token="tok-123")

    wait_until(lambda: discovery.wait("svc", 5.0), what="an answer")

    assert all(r.headers.get("X-Consul-Token") == "tok-123" for r in fake.requests)
    assert all("tok-123" not in str(r.query) for r in fake.requests)


def test_close_stops_the_thread_and_is_idempotent(
    fake: FakeConsul, make_discovery: DiscoveryFactory
) -> None:
    before = set(threading.enumerate())
    discovery = make_discovery(fake.url)
    discovery.snapshot("svc")
    new = [t for t in set(threading.enumerate()) - before if t.name.startswith("meshlib")]

    discovery.close()
    discovery.close()

    assert [t.name for t in new] == ["meshlib-consul"]
    assert not new[0].is_alive()
    assert discovery.wait("other", timeout=5.0) is None  # closed: no waiting


# ---------------------------------------------------------------------- TLS to the agent


def test_https_agent_with_a_private_ca_server_name_and_client_certificate(
    tmp_path: Path, make_discovery: DiscoveryFactory, caplog: pytest.LogCaptureFixture
) -> None:
    pki = Pki(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca)
    server_tls.load_cert_chain(pki.server_cert, pki.server_key)
    server_tls.verify_mode = ssl.CERT_REQUIRED  # Consul's verify_incoming
    fake = FakeConsul(tls=server_tls)
    try:
        fake.set_json(DUMP, dump(entry("a", 8001)), index=7)
        settings = ConsulSettings(
            fake.url,
            cacert=str(pki.ca),
            client_cert=str(pki.client_cert),
            client_key=str(pki.client_key),
            tls_server_name="consul.test",  # the certificate does not name 127.0.0.1
        )
        discovery = make_discovery(settings)
        assert ids_of(discovery, "svc") is None
        wait_until(lambda: ids_of(discovery, "svc") == {"a"}, what="a snapshot over TLS")

        # The same agent without the server name fails verification: TLS is really checked.
        caplog.set_level(logging.WARNING, logger=LOGGER)
        unnamed = make_discovery(dataclasses.replace(settings, tls_server_name=None))
        assert unnamed.wait("svc", timeout=0.5) is None
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    finally:
        fake.close()


class Pki:
    """A CA, a server certificate for ``consul.test`` and a client certificate, as files."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self._ca_name = _name("meshlib test CA")
        ca = (
            _builder(self._ca_name, self._ca_name, self._ca_key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(ca.public_bytes(Encoding.PEM))
        self.server_cert, self.server_key = self._leaf("server")
        self.client_cert, self.client_key = self._leaf("client")

    def _leaf(self, role: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            _builder(_name(f"{role}.consul.test"), self._ca_name, key)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("consul.test")]), False)
            .sign(self._ca_key, hashes.SHA256())
        )
        cert_path, key_path = self._directory / f"{role}.pem", self._directory / f"{role}.key"
        cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
        key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        return cert_path, key_path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )


def test_a_closed_discovery_on_a_shared_engine_hears_no_more_resets(fake: FakeConsul) -> None:
    fake.set_json(DUMP, dump(entry("a", 8001)), index=100)
    settings = ConsulSettings(fake.url)
    engine = Engine.shared(settings)
    try:
        closed = ConsulDiscovery(settings, engine=Engine.shared(settings))
        still = ConsulDiscovery(settings, engine=Engine.shared(settings))
        heard: list[str] = []
        engine.on_reset(lambda: heard.append("reset"))
        wait_until(lambda: still.snapshot("svc"), what="first snapshot")
        fake.handled(DUMP)
        closed.close()
        assert not engine.closed  # others still use it
        fake.set_json(DUMP, dump(entry("a", 8001)), index=5)  # backwards: a restart
        wait_until(lambda: heard, what="the reset")
        wait_until(lambda: still._reset_at is not None, what="the open one told")
        assert closed._reset_at is None  # the closed one was not
        still.close()
    finally:
        engine.release()
    assert engine.closed


def test_a_watch_stopped_as_its_query_fails_leaves_no_unretrieved_task_error() -> None:
    # Seen at the end of `nox -s bench` (rows 8 and 9): engines stopping while a blocking
    # query was refusing a new connection logged "Task exception was never retrieved".
    import asyncio
    import gc

    from meshlib.consul._engine import _Reconnected

    errors: list[str] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: errors.append(context["message"])
        )
        for turns in range(1, 6):  # cancel the watch at each point of the query's life

            async def fails() -> tuple[Any, int]:
                raise _Reconnected

            watch = asyncio.ensure_future(
                Engine._unless_reset(None, fails(), asyncio.Event())  # type: ignore[arg-type]
            )
            for _ in range(turns):
                await asyncio.sleep(0)
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, _Reconnected):
                await watch
            gc.collect()

    asyncio.run(main())
    assert errors == []
