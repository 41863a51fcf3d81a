"""``meshlib top``: the service graph from Prometheus, one line per edge.

Each edge (source service -> destination service) comes from the client-side histogram
``http_client_request_duration_seconds`` that every meshlib caller exposes, so the graph
includes callers that serve nothing and destinations that are not meshlib at all. For
each: requests per second, the share that succeeded (no 5xx, no transport error) and the
p99 latency over ``--window``. ``--once`` prints one table and exits; otherwise it redraws
every ``--interval`` seconds until Ctrl-C.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from typing import TextIO

import httpx

__all__ = ["Edge", "edges", "render", "run"]

_METRIC = "http_client_request_duration_seconds"
_BY = "service_name, service_peer_name"


class Edge:
    """One caller -> callee pair and its golden signals."""

    __slots__ = ("p99", "rps", "source", "success", "target")

    def __init__(self, source: str, target: str) -> None:
        self.source = source
        self.target = target
        self.rps = 0.0
        self.success = math.nan
        self.p99 = math.nan


def _query(client: httpx.Client, promql: str) -> list[tuple[tuple[str, str], float]]:
    response = client.get("/api/v1/query", params={"query": promql})
    response.raise_for_status()
    payload = response.json()
    if payload.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {promql!r}: {payload.get('error')}")
    rows = []
    for item in payload["data"]["result"]:
        labels = item["metric"]
        key = (labels.get("service_name", ""), labels.get("service_peer_name", ""))
        if key[1]:  # calls that bypass the mesh have no destination service: no edge
            rows.append((key, float(item["value"][1])))
    return rows


def edges(prometheus: str, window: str = "1m", timeout: float = 5.0) -> list[Edge]:
    """The edges Prometheus at ``prometheus`` knows, sorted by source and destination."""
    found: dict[tuple[str, str], Edge] = {}

    def edge(key: tuple[str, str]) -> Edge:
        if key not in found:
            found[key] = Edge(*key)
        return found[key]

    rate = f"rate({_METRIC}_count[{window}])"
    with httpx.Client(base_url=prometheus, timeout=timeout) as client:
        for key, value in _query(client, f"sum by ({_BY}) ({rate})"):
            edge(key).rps = value
        ok = (
            f"sum by ({_BY}) (rate({_METRIC}_count"
            f'{{http_response_status_code=~"[1-4].."}}[{window}]))'
        )
        for key, value in _query(client, f"{ok} / sum by ({_BY}) ({rate})"):
            edge(key).success = value
        p99 = f"histogram_quantile(0.99, sum by (le, {_BY}) (rate({_METRIC}_bucket[{window}])))"
        for key, value in _query(client, p99):
            edge(key).p99 = value
    return sorted(found.values(), key=lambda e: (e.source, e.target))


def render(rows: list[Edge], window: str) -> str:
    """The table ``meshlib top`` prints."""
    lines = [
        f"{'SOURCE':<20} {'DESTINATION':<20} {'RPS':>9} {'SUCCESS':>8} {'P99':>9}",
    ]
    for e in rows:
        success = "-" if math.isnan(e.success) else f"{e.success * 100:.1f}%"
        p99 = "-" if math.isnan(e.p99) else f"{e.p99 * 1000:.0f}ms"
        lines.append(
            f"{e.source or '(client)':<20} {e.target:<20} {e.rps:>9.2f} {success:>8} {p99:>9}"
        )
    if not rows:
        lines.append(f"(no meshlib traffic in the last {window})")
    return "\n".join(lines) + "\n"


def run(
    prometheus: str,
    *,
    once: bool,
    interval: float,
    window: str,
    out: TextIO = sys.stdout,
) -> int:
    """Print the graph once, or redraw it until interrupted; returns the exit status.

    Ctrl-C (SIGINT) ends the redraw loop at its next step rather than raising
    ``KeyboardInterrupt`` wherever it lands: raised inside httpx's connection pool it can
    leave the pool's lock held, and closing the client then waits on it forever (a hang
    seen once in CI after SIGINT). A query in flight still ends within its timeout.
    """
    stop = threading.Event()
    handled = not once and threading.current_thread() is threading.main_thread()
    if handled:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        while not stop.is_set():
            try:
                table = render(edges(prometheus, window), window)
            except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
                print(
                    f"meshlib top: cannot query Prometheus at {prometheus}: {exc}",
                    file=sys.stderr,
                )
                return 1
            if once:
                out.write(table)
                return 0
            out.write("\x1b[H\x1b[2J" + f"meshlib top  {prometheus}  window {window}\n\n" + table)
            out.flush()
            stop.wait(interval)  # the refresh period of a terminal view
        return 0
    except KeyboardInterrupt:  # Ctrl-C before the handler was in place, or with --once
        return 0
    finally:
        if handled:
            signal.signal(signal.SIGINT, previous)
