"""What the benchmark and chaos scripts share: paths, CPU pinning, machine facts, a table.

The scripts run real processes on loopback. On a machine with two or more cores the
measuring (client) process runs on CPU 0 and every server it starts on CPU 1, so the two
do not take turns on one core; ``pin_servers`` says which CPUs servers get.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
# The test fixtures (real backends, a real Consul agent, `meshlib serve` processes) are
# plain modules in tests/; the scripts use them as they are.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

CLIENT_CPUS: set[int] | None = None
SERVER_CPUS: set[int] | None = None


def pin_client() -> str:
    """Pin this process to CPU 0 (servers go elsewhere); returns how, for the report."""
    global CLIENT_CPUS, SERVER_CPUS
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return f"not pinned: only {len(available)} CPU available"
    CLIENT_CPUS, SERVER_CPUS = {available[0]}, set(available[1:])
    os.sched_setaffinity(0, CLIENT_CPUS)
    return f"client on CPU {sorted(CLIENT_CPUS)}, servers on CPU {sorted(SERVER_CPUS)}"


def pin_server(pid: int) -> None:
    """Move process ``pid`` (one this script started), all its threads, to the server CPUs."""
    if SERVER_CPUS is not None:
        _pin_threads(pid, SERVER_CPUS)


def pin_as_client(pid: int) -> None:
    """Move process ``pid`` (a measuring worker this script started) to the client CPU."""
    if CLIENT_CPUS is not None:
        _pin_threads(pid, CLIENT_CPUS)


def _pin_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid``: ``sched_setaffinity(pid)`` moves only the main one.

    A process started from the pinned client inherits the client's CPU in all the threads
    it made before it was moved; Consul's Go runtime makes several at once, and its HTTP
    API, answered on those, starved beside the load loop (chaos `rolling` in CI: the
    agent's health query timed out after 5 s). Threads made later inherit from their maker.
    """
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:  # no /proc: the process's main thread, as before
        threads = [pid]
    for tid in threads:
        with contextlib.suppress(ProcessLookupError):  # that thread ended meanwhile
            os.sched_setaffinity(tid, cpus)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; ``values`` need not be sorted."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def wait_listening(port: int, timeout: float = 10) -> None:
    """Return once something accepts connections on ``127.0.0.1:port``."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}") from None
            time.sleep(0.02)


async def async_round(
    client: httpx.AsyncClient, url: str, concurrency: int, seconds: float
) -> tuple[list[float], float]:
    """``concurrency`` workers GET ``url`` on ``client`` for ``seconds``: latencies, elapsed."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: list[str] = []
    end = loop.time() + seconds

    async def worker() -> None:
        while loop.time() < end:
            t0 = time.perf_counter()
            response = await client.get(url)
            latencies.append(time.perf_counter() - t0)
            if response.status_code != 200:
                errors.append(str(response.status_code))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if errors:
        raise RuntimeError(f"{url}: {len(errors)} errors, first HTTP {errors[0]}")
    return latencies, time.perf_counter() - started


async def compare_async(
    paths: Mapping[str, tuple[httpx.AsyncClient, str]],
    rounds: int,
    seconds: float,
    concurrency: int = 32,
) -> dict[str, dict[str, Any]]:
    """Throughput and latency of each path (name -> (client, url)), ``concurrency`` in flight.

    Each path is warmed first; rounds alternate the paths' order, so a change in machine
    load hits every path alike.
    """
    for client, url in paths.values():
        await async_round(client, url, concurrency, min(seconds, 0.5))  # warm
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    elapsed = dict.fromkeys(paths, 0.0)
    names = list(paths)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            client, url = paths[name]
            got, took = await async_round(client, url, concurrency, seconds)
            latencies[name] += got
            elapsed[name] += took
    return {
        name: {
            "requests": len(latencies[name]),
            "req_per_s": len(latencies[name]) / elapsed[name],
            "p50_ms": percentile(latencies[name], 50) * 1e3,
            "p99_ms": percentile(latencies[name], 99) * 1e3,
        }
        for name in paths
    }


def machine() -> dict[str, Any]:
    """Where the figures came from."""
    import httpx

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu_model": model or platform.processor(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "httpx": httpx.__version__,
        "httpcore": _version("httpcore"),
        "uvicorn": _version("uvicorn"),
        "platform": platform.platform(),
        "git_commit": commit,
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


#: the 1-minute load average above which a row's verdict is "noisy" (2 cores)
QUIET_LOAD = 1.5


@dataclass
class Line:
    """One line of a results table."""

    row: str
    measure: str
    result: str
    goal: str
    met: bool | None  # None: no goal, or not measurable yet
    #: the higher 1-minute load average of the machine before and after the row ran
    load: float | None = None

    @property
    def verdict(self) -> str:
        """``ok``, ``MISSED``, ``-``, or ``noisy`` for a goal measured on a busy machine.

        A ratio from a machine whose load average was above ``QUIET_LOAD`` while the row ran
        says more about the other work than about meshlib: it is not counted as met.
        """
        if self.met is None:
            return "-"
        if self.load is not None and self.load > QUIET_LOAD:
            return f"noisy (load {self.load:.1f})"
        return "ok" if self.met else "MISSED"


def print_table(
    title: str, lines: Iterable[Line], headings: Sequence[str] = ("", "measure", "result", "goal")
) -> None:
    """Print ``lines`` as one aligned table."""
    rows = [
        (*headings, ""),
        *((x.row, x.measure, x.result, x.goal, x.verdict) for x in lines),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"\n{title}")
    for index, row in enumerate(rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
        if index == 0:
            print("  ".join("-" * width for width in widths))


def write_json(path: Path, payload: dict[str, Any], lines: Iterable[Line]) -> None:
    """Write the raw figures, the table and the machine to ``path``."""
    document = {"machine": machine(), "table": [asdict(x) for x in lines], **payload}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nraw figures: {path}")


class PlainServer:
    """One bench/plain_server.py process on 127.0.0.1, pinned to the server CPUs."""

    def __init__(
        self, name: str = "plain", *, delay_ms: float = 0.0, mode: str = "ok", port: int = 0
    ) -> None:
        from backends import free_port

        self.name = name
        self.port = port or free_port()
        self.args = ["--name", name, "--delay-ms", str(delay_ms), "--mode", mode]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> PlainServer:
        """Start it and wait until it accepts connections."""
        import socket
        import time

        script = Path(__file__).with_name("plain_server.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--port", str(self.port), *self.args],
            stdin=subprocess.DEVNULL,
        )
        pin_server(self.proc.pid)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"plain server {self.name} exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"plain server {self.name} did not start") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL (a crash) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> PlainServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
