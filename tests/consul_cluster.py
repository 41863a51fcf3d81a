"""A real Consul cluster for the tests: three servers and a client agent on loopback.

Dev agents are single servers that never lose a leader. A cluster is what production runs:
the process talks to its local client agent, which forwards to the servers, and killing
the leader starts an election (about 1-3 s here with ``raft_multiplier = 1``). Each agent
is a ``ConsulAgent`` run without ``-dev``: a data directory of its own, free loopback
ports, and ``-retry-join`` to the servers' LAN gossip ports.

Fixture: ``consul_cluster`` (function) starts one and stops it at teardown.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from consul_agent import _PORT_NAMES, _UDP_TOO, HOST, ConsulAgent, _free_port
from polling import wait_until

#: starts of the whole cluster when a picked port was taken meanwhile
_ATTEMPTS = 3


class ClusterAgent(ConsulAgent):
    """One agent of a ``ConsulCluster``: a server (``-bootstrap-expect=3``) or a client."""

    def __init__(self, binary: str, directory: Path, name: str, *, server: bool) -> None:
        super().__init__(binary, node_name=name, log_dir=directory)
        self.server = server
        self.data_dir = directory / f"{name}-data"
        self.join: list[str] = []
        # picked now so every agent can be told the others' addresses before any starts
        self.ports = {p: _free_port(udp=p in _UDP_TOO) for p in _PORT_NAMES}

    @property
    def serf_lan_addr(self) -> str:
        """Where the others join this agent."""
        return f"{HOST}:{self.ports['serf_lan']}"

    @property
    def server_addr(self) -> str:
        """The RPC address ``/v1/status/leader`` names for a server."""
        return f"{HOST}:{self.ports['server']}"

    def _argv(self) -> list[str]:
        p = self.ports
        argv = [
            self.binary, "agent",
            f"-datacenter={self.datacenter}",
            f"-node={self.node_name}",
            f"-data-dir={self.data_dir}",
            f"-bind={HOST}", f"-client={HOST}", f"-advertise={HOST}",
            f"-http-port={p['http']}",
            f"-grpc-port={p['grpc']}",
            "-grpc-tls-port=-1",
            "-https-port=-1",
            "-dns-port=-1",
            f"-serf-lan-port={p['serf_lan']}",
            f"-serf-wan-port={p['serf_wan']}",
            f"-server-port={p['server']}",
            "-log-level=info",
            "-retry-interval=1s",
            "-hcl=disable_update_check = true",
            "-hcl=connect { enabled = true }",
            "-hcl=performance { raft_multiplier = 1 }",
        ]  # fmt: skip
        if self.server:
            argv += ["-server", "-bootstrap-expect=3"]
        argv += [f"-retry-join={address}" for address in self.join]
        return argv

    def _wait_ready(self, timeout: float, offset: int) -> None:
        """Only until the HTTP API answers: a server alone has no leader to wait for."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"consul exited while starting:\n{self._log_tail(offset)}")
            try:
                self.get("/v1/status/peers", timeout=1.0)
                return
            except (OSError, ValueError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"consul did not answer:\n{self._log_tail(offset)}")
            time.sleep(0.05)  # poll interval while the agent boots


class ConsulCluster:
    """Three servers and one client agent; ``client`` is the agent processes talk to."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.servers = [
            ClusterAgent(binary, directory, f"server-{i}-{time.monotonic_ns()}", server=True)
            for i in range(3)
        ]
        self.client = ClusterAgent(binary, directory, f"client-{time.monotonic_ns()}", server=False)
        for agent in self.agents:
            agent.join = [s.serf_lan_addr for s in self.servers if s is not agent]

    def _fresh_ports(self) -> None:
        """New free ports for every agent, told to the others; data from the failed try gone."""
        for agent in self.agents:
            agent.ports = {p: _free_port(udp=p in _UDP_TOO) for p in _PORT_NAMES}
            shutil.rmtree(agent.data_dir, ignore_errors=True)
        for agent in self.agents:
            agent.join = [s.serf_lan_addr for s in self.servers if s is not agent]

    @property
    def agents(self) -> list[ClusterAgent]:
        """Every agent, servers first."""
        return [*self.servers, self.client]

    def start(self, timeout: float = 60.0) -> ConsulCluster:
        """Start every agent; return once there is a leader and the client is in the catalog.

        The agents' ports are picked before any starts (each is told the others'), so a port
        another process took meanwhile fails a start ("address already in use", seen in CI
        once): then every agent stops, and the cluster starts again on fresh ports.
        """
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                for agent in self.agents:
                    agent.start()
                break
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or attempt == _ATTEMPTS:
                    raise
                self.stop()
                self._fresh_ports()
        self.wait_for_leader(timeout)
        node = self.client.node_name
        wait_until(
            lambda: self.client.get(f"/v1/catalog/node/{node}", timeout=2.0),
            timeout=timeout,
            what="the client agent in the catalog",
        )
        return self

    def leader(self) -> ClusterAgent | None:
        """The server that leads now, as the client agent sees it (None during an election)."""
        try:
            address = self.client.get("/v1/status/leader", timeout=1.0)
        except (OSError, ValueError):
            return None
        return next((s for s in self.servers if s.server_addr == address and s.running), None)

    def wait_for_leader(self, timeout: float = 30.0) -> ClusterAgent:
        """Block until a (running) server leads."""
        return wait_until(self.leader, timeout=timeout, what="a leader", interval=0.02)

    def stop(self) -> None:
        """Stop every agent."""
        for agent in self.agents:
            agent.stop()


@pytest.fixture
def consul_cluster(consul_bin: str, tmp_path: Path) -> Iterator[ConsulCluster]:
    """A started three-server cluster with a client agent; stopped afterwards."""
    cluster = ConsulCluster(consul_bin, tmp_path / "cluster")
    try:
        yield cluster.start()
    finally:
        cluster.stop()
