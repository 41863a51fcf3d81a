"""Rows 5 and 6: what watching services in a real Consul costs one process.

Each row starts a real Consul agent (pinned to the server CPUs), registers the services,
and runs a worker process (this file, ``worker`` subcommand, pinned to the client CPU)
that builds the meshlib runtime, watches every service and reports in JSON:

* row 5 -- memory the runtime adds (RSS after ``import httpx`` vs after ``import meshlib``
  and 50 watches answered) and the CPU it burns while nothing changes;
* row 6 -- threads meshlib starts and connections it holds to the agent for 2,000 watched
  services, how long until all of them first answered, and how long after a change in
  Consul (a new instance registered for 20 of the services, all at once) the worker's
  snapshot shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harness import Line, percentile, pin_as_client, pin_server


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _put(address: str, path: str, body: Any) -> None:
    request = urllib.request.Request(
        f"http://{address}{path}", data=json.dumps(body).encode(), method="PUT"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def _register(address: str, name: str, service_id: str, port: int) -> None:
    body = {"Name": name, "ID": service_id, "Address": "127.0.0.1", "Port": port}
    _put(address, "/v1/agent/service/register", body)


def _connections(address: str) -> int:
    """The established TCP connections of this process to ``address``'s port."""
    port = f":{int(address.rsplit(':', 1)[1]):04X}"
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table, encoding="ascii") as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                count += fields[2].endswith(port) and fields[3] == "01"  # ESTABLISHED
    return count


# ---------------------------------------------------------------------- the worker process


def worker(address: str, names: list[str], idle: float, changes: list[str], timeout: float) -> None:
    """Run in the measured process: print one JSON line of figures."""
    first_timeout = max(timeout, 30.0)
    import httpx  # the baseline: an application that already uses httpx

    assert httpx
    result: dict[str, Any] = {"rss_httpx": _rss_bytes(), "threads_before": _threads()}
    importing = time.perf_counter()
    import meshlib  # what an application imports; the modules below are in it

    result["import_s"] = time.perf_counter() - importing
    assert meshlib
    from meshlib._config import load_config
    from meshlib._runtime import Mesh
    from meshlib.discovery import Snapshot

    result["rss_meshlib_imported"] = _rss_bytes()
    seen: dict[str, float] = {}
    wanted = {f"{name}-new": name for name in changes}

    def listener(snapshot: Snapshot) -> None:
        for endpoint in snapshot.endpoints:
            if endpoint.id in wanted and endpoint.id not in seen:
                seen[endpoint.id] = time.monotonic()

    started = time.monotonic()
    mesh = Mesh(load_config({"CONSUL_HTTP_ADDR": address}))
    mesh.discovery.subscribe(listener)
    for name in names:
        mesh.discovery.snapshot(name)
    answered = 0
    while answered < len(names) and time.monotonic() - started < first_timeout:
        time.sleep(0.05)
        answered = sum(mesh.discovery.snapshot(name) is not None for name in names)
    result["first_answers_s"] = time.monotonic() - started
    result["first_answered"] = answered
    result["first_timeout_s"] = first_timeout
    result["cpu_until_first_answers_s"] = time.process_time()
    result["threads_after"] = _threads()
    result["connections"] = _connections(address)
    result["rss_runtime"] = _rss_bytes()
    if idle:
        time.sleep(1.0)  # let the first round of blocking queries settle
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(idle)
        result["idle_cpu_share"] = (time.process_time() - cpu) / (time.monotonic() - wall)
        result["idle_seconds"] = idle
    if changes:
        time.sleep(1.0)  # every watch is now in (or queued for) a blocking query
        with ThreadPoolExecutor(8) as pool:
            marks = list(
                pool.map(
                    lambda n: (_register(address, n, f"{n}-new", 40000), time.monotonic())[1],
                    changes,
                )
            )
        registered = dict(zip(wanted, marks, strict=True))
        deadline = time.monotonic() + timeout
        while len(seen) < len(wanted) and time.monotonic() < deadline:
            time.sleep(0.01)
        result["converge_s"] = {
            key: (seen[key] - registered[key]) if key in seen else None for key in wanted
        }
        result["converge_timeout_s"] = timeout
    mesh.close()
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------- the bench side


def _agent() -> Any:
    from consul_agent import ConsulAgent
    from tools import find_tool

    agent = ConsulAgent(find_tool("consul"))
    agent.start()
    assert agent.pid is not None
    pin_server(agent.pid)
    return agent


def _run_worker(
    address: str,
    names: list[str],
    *,
    idle: float = 0.0,
    changes: list[str] = (),
    timeout: float = 0.0,
) -> dict[str, Any]:
    argv = [
        sys.executable, str(Path(__file__).resolve()), "worker", "--address", address,
        "--names", ",".join(names), "--idle", str(idle), "--changes", ",".join(changes),
        "--timeout", str(timeout),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    pin_as_client(proc.pid)
    out, _ = proc.communicate(timeout=idle + timeout + 300)
    if proc.returncode != 0:
        raise RuntimeError(f"the consul worker failed with {proc.returncode}")
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return figures


def _register_many(address: str, names: list[str]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(lambda i: _register(address, names[i], names[i], 20000 + i), range(len(names)))
        )


def idle_cost(quick: bool) -> tuple[list[Line], dict[str, Any]]:
    """Row 5: RSS added by the runtime and idle CPU, 50 watched services."""
    names = [f"svc{i:03d}" for i in range(50)]
    agent = _agent()
    try:
        _register_many(agent.http_addr, names)
        figures = _run_worker(agent.http_addr, names, idle=3.0 if quick else 60.0)
    finally:
        agent.stop()
    mib = 1024 * 1024
    added = (figures["rss_runtime"] - figures["rss_httpx"]) / mib
    imported = (figures["rss_meshlib_imported"] - figures["rss_httpx"]) / mib
    cpu = figures["idle_cpu_share"] * 100
    lines = [
        Line(
            "5",
            "RSS added: import + runtime, 50 watches",
            f"{added:.1f} MiB (import {imported:.1f} MiB, {figures['import_s'] * 1000:.0f} ms)",
            "≤ 15 MiB",
            added <= 15,
        ),
        Line(
            "5",
            f"idle CPU, 50 watches, {figures['idle_seconds']:.0f} s",
            f"{cpu:.2f}% of a core",
            "≤ 0.2%",
            cpu <= 0.2,
        ),
    ]
    return lines, {"row5_idle_cost": figures}


def scale(quick: bool) -> tuple[list[Line], dict[str, Any]]:
    """Row 6: threads, connections and first answers for 2,000 services; convergence."""
    count = 200 if quick else 2000
    names = [f"svc{i:04d}" for i in range(count)]
    changes = names[:: count // 20][:20]
    timeout = 20.0 if quick else 60.0
    agent = _agent()
    try:
        _register_many(agent.http_addr, names)
        figures = _run_worker(agent.http_addr, names, changes=changes, timeout=timeout)
    finally:
        agent.stop()
    threads = figures["threads_after"] - figures["threads_before"]
    first_ok = figures["first_answered"] == len(names)
    first = (
        f"{figures['first_answers_s']:.2f} s"
        if first_ok
        else f"{figures['first_answered']}/{len(names)} in {figures['first_timeout_s']:.0f} s"
    )
    times = list(figures["converge_s"].values())
    done = [t for t in times if t is not None]
    missing = len(times) - len(done)
    worst = f"> {timeout:.0f} s" if missing else f"{max(done):.2f} s"
    median = percentile(done, 50) if done else float("nan")
    within = sum(t <= 2.0 for t in done)
    converged = f"worst {worst}, median {median:.2f} s; {within}/{len(times)} within 2 s" + (
        f", {missing} not within {timeout:.0f} s" if missing else ""
    )
    n = f"{count:,} services"
    lines = [
        Line("6", f"{n}: threads meshlib adds", str(threads), "≤ 2", threads <= 2),
        Line(
            "6",
            f"{n}: connections to the agent",
            str(figures["connections"]),
            "≤ 5",
            figures["connections"] <= 5,
        ),
        Line(
            "6",
            f"{n}: first answer for all",
            first,
            "≤ 5 s",
            first_ok and figures["first_answers_s"] <= 5.0,
        ),
        Line(
            "6",
            f"{n}: converge after {len(times)} changes",
            converged,
            "≤ 2 s",
            not missing and max(done) <= 2.0,
        ),
    ]
    return lines, {"row6_scale": figures}


def main() -> None:
    """The worker subcommand (the rows run from bench/perf.py)."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("worker")
    run.add_argument("--address", required=True)
    run.add_argument("--names", required=True)
    run.add_argument("--idle", type=float, default=0.0)
    run.add_argument("--changes", default="")
    run.add_argument("--timeout", type=float, default=0.0)
    args = parser.parse_args()
    changes = [name for name in args.changes.split(",") if name]
    worker(args.address, args.names.split(","), args.idle, changes, args.timeout)


if __name__ == "__main__":
    main()
