"""A real Consul agent for the tests: ``consul agent -dev`` on free loopback ports.

A pytest plugin (``pytest_plugins = ["consul_agent"]`` in tests/conftest.py). Tests that
speak to Consul use a real agent rather than a mock, so they prove meshlib against Consul's
actual blocking queries, health states and index behaviour. Dev mode keeps everything in
memory, is ready (leader elected, node in the catalog) about 0.2 s after it starts, and
comes back EMPTY after a restart, with a lower index than before.

Fixtures:

``consul_bin`` (session)
    Path of a consul binary from ``tools.find_tool`` (found, cached or built); without one
    (no Go to build it) the tests that need it skip, saying how to get one.
``consul`` (session)
    One started ``ConsulAgent`` shared by most tests. Tests clean up what they register or
    write, or use unique names; they never stop it.
``consul_factory`` (function)
    ``consul_factory(datacenter="dc1", node_name=None, retry_join_wan=None, start=True,
    extra_args=(), acl=False)`` starts a private agent (one a test stops and restarts, a
    second datacenter joined over WAN, one with other settings such as
    ``-hcl=connect { enabled = false }``); all are stopped at teardown. With ``acl=True``
    ACLs are on with ``default_policy = "deny"`` and a random initial management token,
    ``agent.management_token``, which the agent's own HTTP helpers send.
``consul_client`` (function)
    A py-consul client of the shared agent, its HTTP session closed at teardown.

Any test using one of these fixtures is marked ``consul`` automatically, so
``pytest -m "not consul"`` runs without Consul.

``registered`` (function)
    A list to put service IDs in; they are deregistered from the shared agent afterwards.

Helpers: ``ConsulAgent.get(path)`` / ``.put(path, body)`` / ``.delete(path)`` speak JSON
to the agent's HTTP API (with the management token, if ACLs are on);
``acl_token(agent, rules)`` creates a policy of those HCL rules and a token holding only it,
and returns the token's secret;
``register(agent, name, service_id, port)`` registers an instance with a passing TTL check
(``service:<id>``) and waits until the catalog shows it; ``set_checks(agent, service,
statuses)`` sets TTL checks passing, warning or critical through the agent and waits until
Consul's health API shows them; ``unique(prefix)`` makes a service name no other test uses.

``ConsulAgent(binary, https=True, extra_args=[tls hcl])`` also opens the HTTPS API on a free
port (``agent.https_port``), the TLS files given as ``-hcl=tls { defaults { ... } }``; its
HTTP port stays open for the helpers above (set-up and readiness, with the management token).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest

from missing_tools import require_tool
from polling import wait_until

__all__ = ["ConsulAgent", "ConsulFactory", "acl_token", "register", "unique"]

HOST = "127.0.0.1"
_PORT_NAMES = ("http", "grpc", "serf_lan", "serf_wan", "server")
_UDP_TOO = frozenset({"serf_lan", "serf_wan"})  # serf gossips over UDP and TCP
_BIND_ATTEMPTS = 4
_names = itertools.count(1)
_handed_out: set[int] = set()
_running: set[ConsulAgent] = set()


class ConsulAgent:
    """One ``consul agent -dev`` process bound to 127.0.0.1, every port picked free.

    Ports are picked at the first ``start()`` and kept: ``restart()`` brings the agent back
    on the same ports (with an empty state: dev mode keeps nothing across restarts).
    """

    def __init__(
        self,
        binary: str,
        *,
        datacenter: str = "dc1",
        node_name: str | None = None,
        retry_join_wan: Sequence[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        acl: bool = False,
        https: bool = False,
    ) -> None:
        self.binary = binary
        #: whether the HTTPS API is on (its TLS files given in ``extra_args``)
        self.https = https
        #: with ACLs on (default deny): the initial management token, sent by get/put/delete
        self.management_token = str(uuid.uuid4()) if acl else None
        self.datacenter = datacenter
        self.node_name = node_name or f"meshlib-{datacenter}-{os.getpid()}-{next(_names)}"
        self.retry_join_wan = tuple(retry_join_wan or ())
        self.extra_args = tuple(extra_args)
        directory = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp("-consul"))
        directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / f"{self.node_name}.log"
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def http_port(self) -> int:
        """The HTTP API port (picked at the first start)."""
        return self.ports["http"]

    @property
    def http_addr(self) -> str:
        """``127.0.0.1:PORT`` of the HTTP API, as ``CONSUL_HTTP_ADDR`` takes it."""
        return f"{HOST}:{self.http_port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.http_addr}"

    @property
    def https_port(self) -> int:
        """The HTTPS API port (``https=True``; picked at the first start)."""
        return self.ports["https"]

    @property
    def serf_wan_addr(self) -> str:
        """Where another datacenter's agent joins this one (``retry_join_wan``)."""
        return f"{HOST}:{self.ports['serf_wan']}"

    @property
    def pid(self) -> int | None:
        """The PID of the running agent, or None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the agent process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> ConsulAgent:
        """Start the agent and return once it has a leader and its node is in the catalog.

        On a first start a port lost to another process is retried on fresh ports; a
        restart keeps its ports, so it only retries the same ones. An agent that never
        becomes ready is killed and started again, twice at most.
        """
        if self.running:
            return self
        first = not self.ports
        hung = 0
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            if first:
                names = (*_PORT_NAMES, "https") if self.https else _PORT_NAMES
                self.ports = {name: _free_port(udp=name in _UDP_TOO) for name in names}
            try:
                self._launch(timeout)
            except _StartHung:
                # Seen in CI: a restarted server agent on a loaded machine wrote its start-up
                # warnings, then nothing for 30 s; and (chaos's data-dir server, load 4.7)
                # twice in a row not even its first line. Not reproduced idle (8 restarts,
                # 1.1-2.0 s each). It is killed and started again, twice at most.
                hung += 1
                if hung > _HUNG_RETRIES:
                    raise
                continue
            except _BindFailed as exc:
                if attempt == _BIND_ATTEMPTS:
                    raise RuntimeError(f"consul could not bind its ports: {exc}") from None
                if not first:
                    time.sleep(0.2 * attempt)  # the same ports: give their holder a moment
                continue
            return self
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the agent: SIGTERM, wait up to ``timeout``, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """Kill the agent with SIGKILL at once (a crash, not a shutdown)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self.stop()

    def restart(self, timeout: float = 30.0) -> ConsulAgent:
        """Stop and start again on the same ports (dev mode: with an empty state)."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> ConsulAgent:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.http_addr if self.ports else "no ports yet"
        return f"<ConsulAgent {self.node_name} dc={self.datacenter} {where} pid={self.pid}>"

    # ------------------------------------------------------------------ HTTP helpers

    def get(self, path: str, timeout: float = 5.0) -> Any:
        """GET ``path`` from the HTTP API and return the decoded JSON body."""
        request = urllib.request.Request(self.url + path, headers=self._headers())
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def put(self, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        """PUT ``body`` (JSON-encoded unless bytes) to ``path``; return the decoded answer."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method="PUT", headers=self._headers()
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        try:
            return json.loads(raw or b"null")
        except ValueError:
            return raw.decode()

    def delete(self, path: str, timeout: float = 5.0) -> Any:
        """DELETE ``path`` (a config entry, a KV key); return the decoded answer."""
        request = urllib.request.Request(self.url + path, method="DELETE", headers=self._headers())
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        try:
            return json.loads(raw or b"null")
        except ValueError:
            return raw.decode()

    # ------------------------------------------------------------------ internals

    def _headers(self) -> dict[str, str]:
        token = self.management_token
        return {"X-Consul-Token": token} if token else {}

    def _argv(self) -> list[str]:
        p = self.ports
        argv = [
            self.binary, "agent", "-dev",
            f"-datacenter={self.datacenter}",
            f"-node={self.node_name}",
            f"-bind={HOST}", f"-client={HOST}", f"-advertise={HOST}",
            f"-http-port={p['http']}",
            f"-grpc-port={p['grpc']}",
            "-grpc-tls-port=-1",
            f"-https-port={p['https'] if self.https else -1}",
            "-dns-port=-1",
            f"-serf-lan-port={p['serf_lan']}",
            f"-serf-wan-port={p['serf_wan']}",
            f"-server-port={p['server']}",
            "-log-level=info",
            # Never call checkpoint-api.hashicorp.com from a test.
            "-hcl=disable_update_check = true",
        ]  # fmt: skip
        if self.management_token is not None:
            argv.append(
                '-hcl=acl { enabled = true, default_policy = "deny", '
                f'tokens {{ initial_management = "{self.management_token}" }} }}'
            )
        argv += [f"-retry-join-wan={addr}" for addr in self.retry_join_wan]
        argv += self.extra_args
        return argv

    def _launch(self, timeout: float) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {' '.join(self._argv())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest reaches us, not the agent
            )
        _running.add(self)
        try:
            self._wait_ready(timeout, offset)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout: float, offset: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        node = urllib.parse.quote(self.node_name, safe="")
        waiting_for = "the agent to answer"
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self._log_tail(offset)
                in_use = [line for line in tail.splitlines() if "address already in use" in line]
                if in_use:
                    raise _BindFailed(f"{in_use[-1].strip()} (ports {self.ports})")
                raise RuntimeError(
                    f"consul exited with status {code} while starting ({waiting_for}); "
                    f"log {self.log_path}:\n{tail}"
                )
            try:
                if self.get("/v1/status/leader", timeout=1.0):
                    waiting_for = "its node in the catalog"
                    if self.get(f"/v1/catalog/node/{node}", timeout=1.0):
                        return
                else:
                    waiting_for = "a leader"
            except (OSError, ValueError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise _StartHung(
                    f"consul did not become ready within {timeout:g} s (waiting for "
                    f"{waiting_for}); log {self.log_path}:\n{self._log_tail(offset)}"
                )
            time.sleep(0.05)  # poll interval while the agent boots

    def _log_tail(self, offset: int, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


#: starts of an agent that never became ready, retried after the first
_HUNG_RETRIES = 2


class _BindFailed(Exception):
    pass


class _StartHung(RuntimeError):
    """The agent runs but never became ready."""


def _free_port(*, udp: bool = False) -> int:
    """A port free on 127.0.0.1 (for TCP, and for UDP too if ``udp``), never handed out twice."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port: int = tcp.getsockname()[1]
            if port in _handed_out:
                continue
            if udp:
                try:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dgram:
                        dgram.bind((HOST, port))
                except OSError:
                    continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port on 127.0.0.1")


@atexit.register
def _stop_all() -> None:
    for agent in list(_running):
        agent.stop(timeout=5.0)


# ---------------------------------------------------------------------- pytest plugin


class ConsulFactory(Protocol):
    """The ``consul_factory`` fixture: start a private agent, stopped at teardown."""

    def __call__(
        self,
        *,
        datacenter: str = "dc1",
        node_name: str | None = None,
        retry_join_wan: Sequence[str] | None = None,
        start: bool = True,
        extra_args: Sequence[str] = (),
        acl: bool = False,
    ) -> ConsulAgent: ...


_CONSUL_FIXTURES = frozenset({"consul_bin", "consul", "consul_factory", "consul_client"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a Consul fixture with ``consul``."""
    for item in items:
        if _CONSUL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.consul)


@pytest.fixture(scope="session")
def consul_bin() -> str:
    """Path of a working consul binary (found, cached, or built on first use)."""
    return require_tool("consul")


@pytest.fixture(scope="session")
def consul(consul_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    """The shared dev agent. Clean up what you register or write; never stop it."""
    agent = ConsulAgent(consul_bin, log_dir=tmp_path_factory.mktemp("consul"))
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def consul_factory(consul_bin: str, tmp_path: Path) -> Iterator[ConsulFactory]:
    """Start private agents (to stop/restart, or as another datacenter); all stopped after."""
    agents: list[ConsulAgent] = []

    def make(
        *,
        datacenter: str = "dc1",
        node_name: str | None = None,
        retry_join_wan: Sequence[str] | None = None,
        start: bool = True,
        extra_args: Sequence[str] = (),
        acl: bool = False,
    ) -> ConsulAgent:
        agent = ConsulAgent(
            consul_bin,
            datacenter=datacenter,
            node_name=node_name,
            retry_join_wan=retry_join_wan,
            log_dir=tmp_path / "consul",
            extra_args=extra_args,
            acl=acl,
        )
        agents.append(agent)
        return agent.start() if start else agent

    yield make
    for agent in agents:
        agent.stop()


@pytest.fixture
def consul_client(consul: ConsulAgent) -> Iterator[Any]:
    """A py-consul client (``consul.Consul``) of the shared agent, closed afterwards."""
    import consul as pyconsul

    client = pyconsul.Consul(host=HOST, port=consul.http_port)
    yield client
    client.http.session.close()  # py-consul's own close() leaves the requests session open


@pytest.fixture
def registered(consul: ConsulAgent) -> Iterator[list[str]]:
    """Service IDs registered on the shared agent; deregistered after the test."""
    ids: list[str] = []
    yield ids
    for service_id in ids:
        consul.put(f"/v1/agent/service/deregister/{service_id}")


def unique(prefix: str) -> str:
    """A service name no other test uses (a valid mesh service name)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def register(
    agent: ConsulAgent,
    name: str,
    service_id: str,
    port: int,
    *,
    ids: list[str] | None = None,
    **fields: Any,
) -> None:
    """Register an instance with a passing TTL check (``service:<id>``)."""
    body = {
        "Name": name,
        "ID": service_id,
        "Address": HOST,
        "Port": port,
        "Check": {"TTL": "60s", "Status": "passing"},
        **fields,
    }
    agent.put("/v1/agent/service/register", body)
    if ids is not None:
        ids.append(service_id)
    # The agent syncs its registrations to the catalog right after, not before, answering.
    wait_until(
        lambda: service_id in {s["ServiceID"] for s in agent.get(f"/v1/catalog/service/{name}")},
        what=f"{service_id} in the catalog",
    )


def set_checks(agent: ConsulAgent, service: str, statuses: dict[str, str]) -> None:
    """Set TTL checks (check ID -> ``passing``, ``warning`` or ``critical``) as an
    application would (``PUT /v1/agent/check/pass|warn|fail/<id>``), and wait until
    ``/v1/health/checks/<service>`` answers with them."""
    verbs = {"passing": "pass", "warning": "warn", "critical": "fail"}
    for check, status in statuses.items():
        agent.put(f"/v1/agent/check/{verbs[status]}/{check}")

    def shown() -> bool:
        checks = agent.get(f"/v1/health/checks/{service}")
        return {c["CheckID"]: c["Status"] for c in checks}.items() >= statuses.items()

    wait_until(shown, what=f"the checks of {service} at {statuses}")


def acl_token(agent: ConsulAgent, rules: str, *, name: str | None = None) -> str:
    """A new token holding only a new policy of ``rules`` (HCL); its secret ID.

    Made with the agent's management token (``consul_factory(acl=True)``), through the same
    HTTP API an operator's ``consul acl policy create`` / ``token create`` use.
    """
    assert agent.management_token is not None, "start the agent with acl=True"
    policy = agent.put("/v1/acl/policy", {"Name": name or unique("policy"), "Rules": rules})
    token = agent.put("/v1/acl/token", {"Policies": [{"ID": policy["ID"]}]})
    return str(token["SecretID"])
