"""Row 4: one of five backends turns 100 ms slower; what the caller's p99 becomes.

The same requests go through ``p2c_ewma`` (the default) and through ``round_robin``.
Round robin keeps sending a fifth of the traffic to the slow instance, so its p99 is the
slow instance's latency; P2C over peak-EWMA latency should stop choosing it. Four caller
threads keep requests overlapping, as a service under load would.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from typing import Any

from harness import Line, PlainServer, percentile

import meshlib
from meshlib._config import load_config

THREADS = 4


def _measure(static: str, lb: str, per_thread: int) -> dict[str, Any]:
    config = load_config({"MESH_STATIC_SERVICES": static, "MESH_LB": lb})
    latencies: list[float] = []
    slow_hits: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def caller(client: meshlib.Client) -> None:
        mine: list[float] = []
        slow = 0
        for _ in range(per_thread):
            t0 = time.perf_counter()
            try:
                response = client.get("http://five/v1/item")
            except Exception as exc:
                errors.append(repr(exc))
                continue
            mine.append(time.perf_counter() - t0)
            slow += response.text == "slow"
        with lock:
            latencies.extend(mine)
            slow_hits.append(slow)

    with meshlib.Client(config=config) as client:
        for _ in range(50):
            client.get("http://five/v1/item")  # warm: connections to every backend
        threads = [threading.Thread(target=caller, args=(client,)) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise RuntimeError(f"{lb}: {len(errors)} errors, first {errors[0]}")
    return {
        "requests": len(latencies),
        "share_to_slow": sum(slow_hits) / max(1, len(latencies)),
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
    }


def slow_backend_p99(quick: bool) -> tuple[list[Line], dict[str, Any]]:
    """Row 4: p99 under p2c_ewma divided by p99 under round_robin."""
    per_thread = 100 if quick else 1000
    with ExitStack() as stack:
        servers = [stack.enter_context(PlainServer(f"fast{i}")) for i in range(4)]
        servers.append(stack.enter_context(PlainServer("slow", delay_ms=100)))
        static = "five=" + ",".join(server.address for server in servers)
        figures = {lb: _measure(static, lb, per_thread) for lb in ("round_robin", "p2c_ewma")}
    ratio = figures["p2c_ewma"]["p99_ms"] / figures["round_robin"]["p99_ms"]
    detail = (
        f"({figures['p2c_ewma']['p99_ms']:.1f} / {figures['round_robin']['p99_ms']:.1f} ms; "
        f"{figures['p2c_ewma']['share_to_slow']:.1%} vs "
        f"{figures['round_robin']['share_to_slow']:.1%} sent to the slow one)"
    )
    lines = [
        Line(
            "4",
            "1 of 5 slow: p99 p2c_ewma/round_robin",
            f"{ratio:.2f} {detail}",
            "≤ 0.2",
            ratio <= 0.2,
        )
    ]
    return lines, {"row4_slow_backend": figures}
