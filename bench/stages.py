"""Where the sync client's added time goes: row 1's request, stage by stage (issue 15).

    python bench/stages.py [--requests 20000]

One ``meshlib.Client`` and one bare ``httpx.Client`` call the same bench/plain_server.py
process, one request at a time, pinned as the benchmark pins them. Each stage of the mesh's
request path is wrapped in a timer (``time.perf_counter_ns`` before and after: about 0.1 µs
per stage, reported as "timer cost"), and the table gives each stage's median per request,
beside bare httpx's own layers. The stages are the pipeline's (src/meshlib/_pipeline.py).
Run it with nothing else on the machine; it prints the load average before and after.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
from harness import PlainServer, pin_client

import meshlib
from meshlib import _pipeline
from meshlib import client as client_module
from meshlib._config import load_config

#: stage name -> nanoseconds spent in it during the current request
_spent: dict[str, int] = {}


def _timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter_ns()
        try:
            return function(*args, **kwargs)
        finally:
            _spent[name] = _spent.get(name, 0) + time.perf_counter_ns() - started

    return timed


def _wrap(owner: Any, attribute: str, name: str) -> None:
    setattr(owner, attribute, _timed(name, getattr(owner, attribute)))


def _instrument() -> None:
    """Timers around each stage of the mesh's path and the httpx layers under it."""
    _wrap(client_module.MeshTransport, "handle_request", "mesh transport (all below)")
    _wrap(_pipeline.Admission, "next", "1 classify, route, limits (Admission.next)")
    _wrap(_pipeline.Call, "__init__", "2 deadline, policy, telemetry start (Call())")
    _wrap(_pipeline.Call, "start_attempt", "3-5 breaker, balance, attempt set-up")
    _wrap(client_module._Plaintext, "handle_request", "6 send + receive headers (httpx)")
    _wrap(client_module, "_read_within_attempt", "6 read the body (httpx)")
    _wrap(_pipeline.Call, "attempt_responded", "7 outcome: retry?, ejection, latency")
    _wrap(_pipeline.Call, "finish", "telemetry: span, duration, log")
    _wrap(httpx.HTTPTransport, "handle_request", "httpx transport (both)")


def _median_per_request(samples: list[dict[str, int]], name: str) -> float:
    return statistics.median(sample.get(name, 0) for sample in samples) / 1000


def _run(client: httpx.Client, url: str, count: int) -> tuple[list[float], list[dict[str, int]]]:
    totals, samples = [], []
    for _ in range(count):
        _spent.clear()
        started = time.perf_counter_ns()
        response = client.get(url)
        totals.append((time.perf_counter_ns() - started) / 1000)
        samples.append(dict(_spent))
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}")
    return totals, samples


def _timer_cost() -> float:
    nothing = _timed("nothing", lambda: None)
    started = time.perf_counter_ns()
    for _ in range(100_000):
        nothing()
    plain = time.perf_counter_ns()
    for _ in range(100_000):
        pass
    return ((plain - started) - (time.perf_counter_ns() - plain)) / 100_000 / 1000


def main() -> None:
    """Print the stage table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    print(pin_client())
    print(f"load average before: {os.getloadavg()}")
    _instrument()
    with PlainServer("bench") as server:
        config = load_config({"MESH_STATIC_SERVICES": f"bench={server.address}"})
        with httpx.Client() as bare, meshlib.Client(config=config) as mesh:
            runs: dict[str, tuple[list[float], list[dict[str, int]]]] = {}
            paths = (
                ("bare", bare, f"http://{server.address}/v1/item"),
                ("mesh", mesh, "http://bench/v1/item"),
            )
            for _, client, url in paths:
                _run(client, url, 500)  # warm: connection, caches
            half = args.requests // 2
            for index in range(2):  # alternate, so a change in load hits both alike
                for name, client, url in paths[:: 1 if index == 0 else -1]:
                    totals, samples = _run(client, url, half)
                    old = runs.get(name, ([], []))
                    runs[name] = (old[0] + totals, old[1] + samples)
    bare_total = statistics.median(runs["bare"][0])
    mesh_total = statistics.median(runs["mesh"][0])
    rows: list[tuple[str, str]] = [
        ("bare httpx.Client.get, whole request", f"{bare_total:.1f}"),
        (
            "  httpx transport (send, headers)",
            f"{_median_per_request(runs['bare'][1], 'httpx transport (both)'):.1f}",
        ),
        ("meshlib.Client.get, whole request", f"{mesh_total:.1f}"),
        ("  added (medians' difference)", f"{mesh_total - bare_total:+.1f}"),
    ]
    mesh_samples = runs["mesh"][1]
    stages = [
        "mesh transport (all below)",
        "1 classify, route, limits (Admission.next)",
        "2 deadline, policy, telemetry start (Call())",
        "3-5 breaker, balance, attempt set-up",
        "6 send + receive headers (httpx)",
        "6 read the body (httpx)",
        "7 outcome: retry?, ejection, latency",
        "telemetry: span, duration, log",
    ]
    for sample in mesh_samples:  # Admission.next makes the Call: its time is stage 2's
        sample[stages[1]] = sample.get(stages[1], 0) - sample.get(stages[2], 0)
    for stage in stages:
        rows.append((f"  {stage}", f"{_median_per_request(mesh_samples, stage):.1f}"))
    inside = sum(_median_per_request(mesh_samples, stage) for stage in stages[1:])
    rows.append(
        (
            "  the transport's own glue (loop, pools, wrappers)",
            f"{_median_per_request(mesh_samples, stages[0]) - inside:.1f}",
        )
    )
    rows.append(
        (
            "  above the transport (httpx.Client, meshlib.Client.send)",
            f"{mesh_total - _median_per_request(mesh_samples, stages[0]):.1f}",
        )
    )
    rows.append(("timer cost per stage (subtract)", f"{_timer_cost():.2f}"))
    print(f"\nsync c=1, {args.requests} requests each, median µs per request")
    width = max(len(stage) for stage, _ in rows)
    for stage, micros in rows:
        print(f"{stage.ljust(width)}  {micros:>7}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
