"""Row 7: what ``meshlib serve`` costs a server, against the same app under plain uvicorn.

One app (bench/asgi_app.py: no framework, so the server and the mesh are all there is to
measure) runs twice, both processes pinned to the server CPUs:

* **meshlib serve**: ``meshlib serve asgi_app:app`` with ``MESH_TLS=off``;
* **plain uvicorn**: ``python -m uvicorn asgi_app:app`` on the **same event loop and HTTP
  protocol**: the bench asks the running ``meshlib serve`` (the app's ``/server`` route
  reads them from the process) and passes them as ``--loop`` and ``--http``, so it follows
  whatever ``meshlib serve`` picks (uvloop when installed, h11 or httptools). Its access log
  and proxy headers are off, as ``meshlib serve`` has them: what is left is the mesh.

What ``meshlib serve`` does per request that plain uvicorn does not: the guarded h11
protocol's checks (``server/_http_guard.py``: versions, header count and size, a header
timer), the inbound telemetry (server span, duration histogram, access log when on), and the
inbound pipeline (``server/_inbound.py``: reserved routes, authorization, deadline, rate and
concurrency limits, fault injection, the repeated-header join).

The client is bench/load_client.py (32 keep-alive connections, raw asyncio, no parsing
beyond each response's length) on its own CPU; it is also run against
bench/plain_server.py, which answers several times faster than either server, to show
that the client is not what limits.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness import Line, PlainServer, pin_server, wait_listening
from load_client import hammer

BENCH = Path(__file__).resolve().parent
CONCURRENCY = 32


@contextmanager
def _importable_from_bench() -> Iterator[None]:
    """bench/ on ``PYTHONPATH`` for the processes started meanwhile (``asgi_app``)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), saved]))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _facts(url: str) -> dict[str, str]:
    with urllib.request.urlopen(f"{url}/server", timeout=10) as response:
        facts: dict[str, str] = json.loads(response.read())
    return facts


class _PlainUvicorn:
    """``python -m uvicorn asgi_app:app`` on the given loop and HTTP protocol."""

    def __init__(self, loop: str, http: str) -> None:
        from backends import free_port

        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(BENCH),
                "asgi_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--loop",
                loop,
                "--http",
                http,
                "--lifespan",
                "on",
                "--no-access-log",
                "--no-proxy-headers",
                "--log-level",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
        )
        pin_server(self.proc.pid)
        wait_listening(self.port, timeout=30)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:port``."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _measure(quick: bool) -> dict[str, Any]:
    from served import Served

    rounds, seconds = (1, 0.5) if quick else (4, 4.0)
    started: list[Any] = []
    try:
        with _importable_from_bench():
            served = Served("asgi_app:app", {"MESH_TLS": "off", "MESH_SERVICE_NAME": "app"})
            started.append(served.start())
            assert served.proc is not None
            pin_server(served.proc.pid)
            facts = _facts(served.url)
            if facts["http"] not in ("h11", "httptools"):
                raise RuntimeError(f"meshlib serve runs an HTTP protocol uvicorn lacks: {facts}")
            plain = _PlainUvicorn(facts["loop"], facts["http"])
            started.append(plain)
        if _facts(plain.url) != facts:
            raise RuntimeError(f"plain uvicorn runs {_facts(plain.url)}, meshlib serve {facts}")
        ports = {"meshlib_serve": served.port, "plain_uvicorn": plain.port}

        async def run() -> dict[str, Any]:
            for port in ports.values():  # warm
                await hammer("127.0.0.1", port, "/", CONCURRENCY, min(seconds, 0.5))
            got = dict.fromkeys(ports, 0)
            took = dict.fromkeys(ports, 0.0)
            names = list(ports)
            for index in range(rounds):
                for name in names if index % 2 == 0 else reversed(names):
                    load = await hammer("127.0.0.1", ports[name], "/", CONCURRENCY, seconds)
                    got[name] += load.requests
                    took[name] += load.seconds
            figures: dict[str, Any] = {
                name: {"requests": got[name], "req_per_s": got[name] / took[name]} for name in names
            }
            with PlainServer("ceiling") as ceiling:
                load = await hammer("127.0.0.1", ceiling.port, "/", CONCURRENCY, seconds)
            figures["client_vs_plain_server"] = {
                "requests": load.requests,
                "req_per_s": load.req_per_s,
            }
            return figures

        figures = asyncio.run(run())
    finally:
        for process in reversed(started):
            process.stop()
    return {**figures, **facts, "concurrency": CONCURRENCY}


def serve_vs_uvicorn(quick: bool) -> tuple[list[Line], dict[str, Any]]:
    """Row 7: throughput of ``meshlib serve`` divided by plain uvicorn's, same app, c=32."""
    figures = _measure(quick)
    mesh = figures["meshlib_serve"]["req_per_s"]
    plain = figures["plain_uvicorn"]["req_per_s"]
    ceiling = figures["client_vs_plain_server"]["req_per_s"]
    ratio = mesh / plain
    headroom = ceiling / max(mesh, plain)
    lines = [
        Line(
            "7",
            "serve c=32: throughput meshlib serve/plain uvicorn",
            f"{ratio:.2f}x (meshlib serve {mesh:.0f}/s, uvicorn {plain:.0f}/s; "
            f"{figures['loop']} + {figures['http']})",
            "≥ 0.9x",
            ratio >= 0.9,
        ),
        Line(
            "7",
            "  the client alone, vs bench/plain_server.py",
            f"{ceiling:.0f}/s, {headroom:.1f}x the faster server"
            + ("" if headroom >= 2 else ": the client may limit"),
            "(its ceiling)",
            None,
        ),
    ]
    return lines, {"row7_serve_vs_uvicorn": figures}
