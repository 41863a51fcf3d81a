"""A three-server Consul cluster and a client agent, as production runs it: leader loss.

The process talks to its client agent; the leader is SIGKILLed under a request loop. The
callers keep their last instances while no server can answer, and a change written during
the election reaches traffic soon after the new leader takes over.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter

import pytest

import meshlib
from backends import BackendFactory
from consul_agent import register, unique
from consul_cluster import ConsulCluster
from meshlib._config import load_config
from meshlib.rollout import AdminScrapeSource, ConsulAPI, ConsulPlane, Options, RolloutError, start
from meshlib.rollout._lock import SESSION_TTL, ControllerLock
from polling import wait_until
from served import Served
from test_rollout import Events


@pytest.mark.consul
def test_the_leader_killed_under_load_fails_no_request_and_a_change_during_the_election_is_used(
    consul_cluster: ConsulCluster, backends: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = consul_cluster.client
    service = unique("elect")
    first, second = backends.many(2)
    register(agent, service, f"{service}-{first.name}", first.port)
    monkeypatch.setenv("CONSUL_HTTP_ADDR", agent.http_addr)
    monkeypatch.setenv("MESH_LB", "round_robin")
    served: list[tuple[float, str]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        with meshlib.Client() as client:
            for _ in range(200_000):  # bounded; stopped long before
                if stop.is_set():
                    return
                try:
                    served.append((time.monotonic(), client.get(f"http://{service}/whoami").text))
                except Exception as exc:
                    failures.append(exc)
                stop.wait(0.005)

    caller = threading.Thread(target=load, daemon=True)
    caller.start()
    changed: list[float] = []

    def change() -> None:
        # through the client agent, forwarded to the servers; retried as any writer would
        # while the client agent still dials the dead server (HTTP 500)
        deadline = time.monotonic() + 30
        while True:
            try:
                write()
                break
            except OSError:  # urllib's HTTPError too
                if time.monotonic() > deadline:
                    raise
                threading.Event().wait(0.05)  # pacing between attempts
        changed.append(time.monotonic())

    def write() -> None:
        agent.put(
            "/v1/catalog/register",
            {
                "Node": f"{service}-node",
                "Address": "127.0.0.1",
                "Service": {"ID": f"{service}-{second.name}", "Service": service,
                            "Port": second.port},
            },
            timeout=30,
        )  # fmt: skip

    try:
        wait_until(lambda: served, what="the first answer")
        old = consul_cluster.wait_for_leader()
        old.kill()
        killed_at = time.monotonic()
        writer = threading.Thread(target=change, daemon=True)
        writer.start()
        new = wait_until(
            lambda: (leader := consul_cluster.leader()) is not old and leader,
            timeout=30,
            what="a new leader",
            interval=0.02,
        )
        elected_at = time.monotonic()
        used_at = wait_until(
            lambda: next(
                (at for at, text in served if text == second.name and at >= killed_at), None
            ),
            timeout=15,
            what="the instance registered during the election in use",
        )
        writer.join(30)
    finally:
        stop.set()
        caller.join(10)
    print(
        f"leader {old.node_name} killed; {new.node_name} led after {elected_at - killed_at:.2f}s; "
        f"change written {changed[0] - killed_at:.2f}s, used {used_at - elected_at:.2f}s after "
        f"the new leader; {len(served)} requests, {len(failures)} failed"
    )
    assert failures == []
    assert used_at - elected_at <= 2.0


@pytest.mark.consul
def test_a_rollout_controller_keeps_its_lock_through_a_leader_change_and_nobody_joins_it(
    consul_cluster: ConsulCluster,
) -> None:
    settings = load_config({"CONSUL_HTTP_ADDR": consul_cluster.client.http_addr}).consul
    assert settings is not None
    service = unique("locked")
    first = ControllerLock(ConsulAPI(settings), service)
    assert first.acquire() is None
    rival = ConsulAPI(settings)
    outcomes: list[str] = []
    try:
        old = consul_cluster.wait_for_leader()
        old.kill()
        killed_at = time.monotonic()
        # a second controller tries again and again, through the election and after it
        while time.monotonic() - killed_at < 3 * SESSION_TTL:
            try:
                holder = ControllerLock(rival, service).acquire()
            except RolloutError as exc:
                outcomes.append(f"error: {exc}")
            else:
                assert holder is not None, "a second controller took the lock"
                outcomes.append("refused")
            threading.Event().wait(0.2)  # pacing between attempts
        new = consul_cluster.wait_for_leader()
        assert new is not old
        assert not first.lost.is_set()
        holder = first.holder()
        assert holder is not None
        assert holder["session"] == first.session
    finally:
        first.release()
        first.api.close()
        rival.close()
    assert outcomes.count("refused") > 10, outcomes
    print(f"\nlock through the leader change: {Counter(o[:40] for o in outcomes)}")


@pytest.mark.consul
def test_a_rollout_survives_a_restart_of_every_consul_server_and_is_promoted(
    consul_cluster: ConsulCluster,
) -> None:
    """A canary rollout, the controller talking to its client agent; after the first passed
    check all three servers are killed and started again (a whole-cluster restart, state
    kept on disk). The controller rides the outage out (one line), keeps its lock, and carries
    on to promotion; callers reading the same Consul lose no request meanwhile."""
    agent = consul_cluster.client
    service = unique("shop")
    apps = [
        Served(
            "canary_app:app",
            {
                "MESH_SERVICE_NAME": service,
                "MESH_SERVICE_VERSION": version,
                "MESH_TEST_FAIL_PERCENT": "0",
                "CONSUL_HTTP_ADDR": agent.http_addr,
            },
        )
        for version in ("v1", "v2")
    ]
    settings = load_config({"CONSUL_HTTP_ADDR": agent.http_addr}).consul
    assert settings is not None
    api = ConsulAPI(settings)
    stop = threading.Event()
    seen: list[str] = []
    failures: list[str] = []

    def call() -> None:
        config = load_config({"CONSUL_HTTP_ADDR": agent.http_addr})
        with meshlib.Client(config=config, timeout=10) as client:
            for _ in range(100_000):  # bounded; stopped long before
                if stop.is_set():
                    return
                try:
                    seen.append(client.get(f"http://{service}/work").json()["version"])
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                stop.wait(0.01)  # pacing: under 100 requests/s

    caller = threading.Thread(target=call, daemon=True)
    restarted: list[float] = []

    def restart_servers() -> None:
        wait_until(
            lambda: any(e["event"] == "check" for e in events.seen), timeout=60, what="a check"
        )
        restarted.append(time.monotonic())  # [0]: killed, [1]: a leader again
        for server in consul_cluster.servers:
            server.kill()  # at once: all three crash together, their data kept on disk
        # down until the controller has seen it fail (a stopped server's RPCs are held and
        # retried by the client agent: a graceful restart went by unseen)
        wait_until(
            lambda: "retrying" in err.getvalue(), timeout=60, what="the controller to see it"
        )
        for server in consul_cluster.servers:
            server.start()
        consul_cluster.wait_for_leader(60)
        restarted.append(time.monotonic())

    events = Events()
    err = io.StringIO()
    try:
        for app in apps:
            app.start()
        agent.put("/v1/config", {"Kind": "service-defaults", "Name": service, "Protocol": "http"})
        agent.put(
            "/v1/config",
            {
                "Kind": "service-resolver",
                "Name": service,
                "DefaultSubset": "v1",
                "Subsets": {v: {"Filter": f"Service.Meta.version == {v}"} for v in ("v1", "v2")},
            },
        )
        wait_until(
            lambda: len(agent.get(f"/v1/health/service/{service}?passing=1")) == 2,
            timeout=60,
            what="both versions passing",
        )
        caller.start()
        wait_until(lambda: len(seen) >= 20, timeout=30, what="the caller's traffic")
        restarter = threading.Thread(target=restart_servers, daemon=True)
        restarter.start()
        options = Options(canary="v2", step=10, interval=1.0, window=1.0, max_p99=5.0, threshold=2)
        # the controller's own code, in this process (the main thread: it handles SIGTERM);
        # the instances' own /mesh/metrics as its metric source
        source = AdminScrapeSource()
        try:
            code = start(ConsulPlane(api), source, service, options, events, err=err)
        finally:
            source.close()
        restarter.join(60)
        assert len(restarted) == 2, "the servers were not restarted during the rollout"
        promoted = time.monotonic()
        wait_until(lambda: seen[-20:] == ["v2"] * 20, timeout=10, what="the callers on v2")
    finally:
        stop.set()
        caller.join(15)
        api.close()
        for app in apps:
            app.stop()
    kinds = [e["event"] for e in events.seen]
    print(
        f"\nrollout through a restart of all servers: events {Counter(kinds)}; no leader for "
        f"{restarted[1] - restarted[0]:.1f}s; promoted {promoted - restarted[1]:.1f}s after; "
        f"{len(seen)} requests, "
        f"{len(failures)} failed; controller said: {err.getvalue().strip()!r}"
    )
    assert code == 0, (events.seen, err.getvalue())
    assert kinds[0] == "started"
    assert kinds[-1] == "promoted"
    assert [e["weight"] for e in events.seen if e["event"] == "check"] == list(range(20, 101, 10))
    # the outage was seen, ridden out, and said once
    assert err.getvalue().count("retrying for 60s") == 1, err.getvalue()
    assert failures == []
