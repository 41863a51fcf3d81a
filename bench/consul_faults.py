"""Rows 8 and 9: Consul failing under traffic, as the callers see it.

* row 8 -- a dev agent restarted ten times in a row on the same ports (it comes back
  empty, its index far below the old one). After each restart a new instance is
  registered; the figure is how long until a request reaches it, and how many requests
  to the instances already known failed meanwhile.
* row 9 -- a three-server cluster and a client agent (the caller talks to the client
  agent, as in production). The leader is SIGKILLed under a request loop while a new
  instance is registered during the election; the figures are the failed requests and how
  long after the new leader took over the new instance was used.

The caller is a ``meshlib.Client`` with ``round_robin`` in a thread of this process; the
backends and the agents are real processes on the server CPUs. The tests
(test_consul_restarts.py, test_consul_cluster.py) check the same behaviour; these rows
record the figures on a quiet machine.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import Line, percentile, pin_server

import meshlib
from meshlib._config import load_config


class _Caller:
    """Requests to ``service`` in a loop (bounded), each answer's time and backend name."""

    def __init__(self, address: str, service: str) -> None:
        self.config = load_config({"CONSUL_HTTP_ADDR": address, "MESH_LB": "round_robin"})
        self.service = service
        self.served: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with meshlib.Client(config=self.config) as client:
            for _ in range(500_000):  # bounded; stopped long before
                if self._stop.is_set():
                    return
                try:
                    text = client.get(f"http://{self.service}/whoami").text
                    self.served.append((time.monotonic(), text))
                except Exception as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.005)  # pacing: about 150 requests/s

    def first_use(self, name: str, since: float, timeout: float) -> float | None:
        """When ``name`` first answered at or after ``since`` (waits up to ``timeout``)."""
        return _await(
            lambda: next(
                (at for at, text in reversed(self.served) if text == name and at >= since), None
            ),
            timeout,
        )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def _await(probe: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.01)  # poll interval
    return None


def _backends(count: int) -> Any:
    from backends import BackendFactory

    factory = BackendFactory()
    servers = factory.many(count)
    for server in servers:
        if server.proc is not None:
            pin_server(server.proc.pid)
    return factory, servers


def restarts(quick: bool) -> tuple[list[Line], dict[str, Any]]:
    """Row 8: ten agent restarts, a new instance after each: when it is first used."""
    from consul_agent import ConsulAgent, register
    from tools import find_tool

    count = 3 if quick else 10
    agent = ConsulAgent(find_tool("consul")).start()
    pin_server(agent.pid or 0)
    factory, servers = _backends(count + 1)
    delays: list[float | None] = []
    caller: _Caller | None = None
    try:
        register(agent, "restarts", f"restarts-{servers[0].name}", servers[0].port)
        caller = _Caller(agent.http_addr, "restarts")
        _await(lambda: caller.served if caller else None, 30)
        for server in servers[1:]:
            agent.restart()  # on the same ports, empty
            pin_server(agent.pid or 0)
            registered_at = time.monotonic()
            register(agent, "restarts", f"restarts-{server.name}", server.port)
            used = caller.first_use(server.name, registered_at, 10.0)
            delays.append(None if used is None else used - registered_at)
    finally:
        if caller is not None:
            caller.stop()
        factory.close()
        agent.stop()
    done = [d for d in delays if d is not None]
    missing = len(delays) - len(done)
    requests = len(caller.served) if caller else 0
    failed = len(caller.failures) if caller else 0
    worst = f"> 10 s ({missing} never)" if missing else f"{max(done):.2f} s"
    result = f"worst {worst}, median {percentile(done, 50):.2f} s; {failed} of {requests} failed"
    ok = not missing and max(done) <= 2.0 and failed == 0
    line = Line("8", f"{count} agent restarts: new instance used after each", result, "≤ 2 s", ok)
    figures = {"row8_restarts": {"delays_s": delays, "requests": requests, "failed": failed}}
    return [line], figures


def leader_loss(quick: bool) -> tuple[list[Line], dict[str, Any]]:
    """Row 9: the leader killed under load; failures and when a change made meanwhile is used."""
    from consul_cluster import ConsulCluster
    from tools import find_tool

    directory = Path(tempfile.mkdtemp(prefix="meshlib-bench-cluster-"))
    cluster = ConsulCluster(find_tool("consul"), directory)
    factory, (first, second) = _backends(2)
    caller: _Caller | None = None
    figures: dict[str, Any] = {}
    try:
        cluster.start()
        for agent in cluster.agents:
            pin_server(agent.pid or 0)
        agent = cluster.client
        agent.put(
            "/v1/agent/service/register",
            {"Name": "elect", "ID": f"elect-{first.name}", "Address": "127.0.0.1",
             "Port": first.port, "Check": {"TTL": "60s", "Status": "passing"}},
        )  # fmt: skip
        caller = _Caller(agent.http_addr, "elect")
        _await(lambda: caller.served if caller else None, 30)
        time.sleep(0.5 if quick else 2.0)  # steady traffic before the kill (measured span)
        before = len(caller.failures)
        old = cluster.wait_for_leader()
        old.kill()
        killed_at = time.monotonic()
        changed: list[float] = []

        def change() -> None:
            # through the client agent, retried as any writer would during the election
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    agent.put(
                        "/v1/catalog/register",
                        {"Node": "elect-node", "Address": "127.0.0.1",
                         "Service": {"ID": f"elect-{second.name}", "Service": "elect",
                                     "Port": second.port}},
                        timeout=30,
                    )  # fmt: skip
                except OSError:
                    time.sleep(0.05)  # pacing between attempts
                    continue
                changed.append(time.monotonic())
                return

        writer = threading.Thread(target=change, daemon=True)
        writer.start()
        _await(lambda: (leader := cluster.leader()) is not old and leader, 30)
        elected_at = time.monotonic()
        used_at = caller.first_use(second.name, killed_at, 15.0)
        writer.join(30)
        time.sleep(0.5 if quick else 2.0)  # steady traffic after (measured span)
        figures = {
            "election_s": elected_at - killed_at,
            "changed_after_kill_s": changed[0] - killed_at if changed else None,
            "used_after_leader_s": None if used_at is None else used_at - elected_at,
            "requests": len(caller.served),
            "failed": len(caller.failures) - before,
        }
    finally:
        if caller is not None:
            caller.stop()
        factory.close()
        cluster.stop()
    used = figures.get("used_after_leader_s")
    lines = [
        Line(
            "9",
            f"leader killed under load (election {figures['election_s']:.2f} s): failed requests",
            f"{figures['failed']} of {figures['requests']}",
            "0",
            figures["failed"] == 0,
        ),
        Line(
            "9",
            "change during the election: used after the new leader",
            "never (15 s)" if used is None else f"{used:.2f} s",
            "≤ 2 s",
            used is not None and used <= 2.0,
        ),
    ]
    return lines, {"row9_leader_loss": figures}
