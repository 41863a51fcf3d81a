"""A three-server Consul cluster and a client agent, as production runs it: leader loss.

The process talks to its client agent; the leader is SIGKILLed under a request loop. The
callers keep their last instances while no server can answer, and a change written during
the election reaches traffic soon after the new leader takes over.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

import meshlib
from backends import BackendFactory
from consul_agent import register, unique
from consul_cluster import ConsulCluster
from meshlib._config import load_config
from meshlib.rollout import ConsulAPI, RolloutError
from meshlib.rollout._lock import SESSION_TTL, ControllerLock
from polling import wait_until


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
