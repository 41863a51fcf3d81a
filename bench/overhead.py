"""Rows 1 and 2: what meshlib adds to a request, against bare httpx on the same server.

Both clients call one bench/plain_server.py process (pinned to its own CPU), so the server
costs as little as possible and the difference between the two is the client's. Rounds
alternate bare and mesh, so a change in machine load hits both alike.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from harness import Line, PlainServer, compare_async, percentile

import meshlib
from meshlib._config import load_config


def _sync_round(client: httpx.Client, url: str, count: int) -> tuple[list[float], float]:
    latencies = []
    started = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        response = client.get(url)
        latencies.append(time.perf_counter() - t0)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}")
    return latencies, time.perf_counter() - started


def sync_overhead(quick: bool) -> tuple[list[Line], dict[str, Any]]:
    """Row 1: meshlib.Client vs httpx.Client, one request at a time."""
    rounds, per_round = (2, 200) if quick else (6, 2500)
    with PlainServer("bench") as server:
        config = load_config({"MESH_STATIC_SERVICES": f"bench={server.address}"})
        urls = {"bare": f"http://{server.address}/v1/item", "mesh": "http://bench/v1/item"}
        with httpx.Client() as bare, meshlib.Client(config=config) as mesh:
            clients = {"bare": bare, "mesh": mesh}
            for name, client in clients.items():
                _sync_round(client, urls[name], 300)  # warm: connection, caches
            latencies: dict[str, list[float]] = {"bare": [], "mesh": []}
            elapsed = {"bare": 0.0, "mesh": 0.0}
            for index in range(rounds):
                order = ("bare", "mesh") if index % 2 == 0 else ("mesh", "bare")
                for name in order:
                    got, took = _sync_round(clients[name], urls[name], per_round)
                    latencies[name] += got
                    elapsed[name] += took
    figures = {
        name: {
            "requests": len(latencies[name]),
            "req_per_s": len(latencies[name]) / elapsed[name],
            "p50_us": percentile(latencies[name], 50) * 1e6,
            "p99_us": percentile(latencies[name], 99) * 1e6,
        }
        for name in ("bare", "mesh")
    }
    added_p50 = figures["mesh"]["p50_us"] - figures["bare"]["p50_us"]
    added_p99 = figures["mesh"]["p99_us"] - figures["bare"]["p99_us"]
    ratio = figures["mesh"]["req_per_s"] / figures["bare"]["req_per_s"]
    bare_text = (
        f"(bare {figures['bare']['p50_us']:.0f}/{figures['bare']['p99_us']:.0f} µs, "
        f"{figures['bare']['req_per_s']:.0f}/s)"
    )
    lines = [
        Line(
            "1",
            "sync c=1: added p50",
            f"{added_p50:+.0f} µs {bare_text}",
            "≤ 30 µs",
            added_p50 <= 30,
        ),
        Line("1", "sync c=1: added p99", f"{added_p99:+.0f} µs", "(none)", None),
        Line("1", "sync c=1: throughput mesh/bare", f"{ratio:.2f}x", "≥ 0.95x", ratio >= 0.95),
    ]
    return lines, {"row1_sync_c1": figures}


async def _async_compare(
    address: str, clients: dict[str, httpx.AsyncClient], rounds: int, seconds: float
) -> dict[str, Any]:
    paths = {
        name: (client, f"http://{address}/v1/item" if name == "bare" else "http://bench/v1/item")
        for name, client in clients.items()
    }
    return await compare_async(paths, rounds, seconds)


async def _aiohttp_round(session: Any, url: str, concurrency: int, seconds: float) -> int:
    loop = asyncio.get_running_loop()
    count = 0
    end = loop.time() + seconds

    async def worker() -> None:
        nonlocal count
        while loop.time() < end:
            async with session.get(url) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status}")
            count += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count


def async_throughput(quick: bool) -> tuple[list[Line], dict[str, Any]]:
    """Rows 2 and 2b: meshlib.AsyncClient vs httpx.AsyncClient and aiohttp, 32 in flight."""
    import aiohttp

    rounds, seconds = (1, 0.5) if quick else (4, 4.0)
    with PlainServer("bench") as server:
        config = load_config({"MESH_STATIC_SERVICES": f"bench={server.address}"})

        async def run() -> dict[str, Any]:
            async with (
                httpx.AsyncClient() as bare,
                meshlib.AsyncClient(config=config) as mesh,
                meshlib.AsyncClient(config=config, transport=httpx.AsyncHTTPTransport()) as old,
            ):
                clients = {"bare": bare, "mesh": mesh, "mesh_on_httpcore_pool": old}
                figures = await _async_compare(server.address, clients, rounds, seconds)
            async with aiohttp.ClientSession() as session:
                url = f"http://{server.address}/v1/item"
                await _aiohttp_round(session, url, 32, min(seconds, 0.5))  # warm
                started = time.perf_counter()
                count = 0
                for _ in range(rounds):
                    count += await _aiohttp_round(session, url, 32, seconds)
                figures["aiohttp"] = {
                    "requests": count,
                    "req_per_s": count / (time.perf_counter() - started),
                }
            return figures

        figures = asyncio.run(run())
    mesh = figures["mesh"]["req_per_s"]
    ratio = mesh / figures["bare"]["req_per_s"]
    detail = f"(bare {figures['bare']['req_per_s']:.0f}/s, mesh {mesh:.0f}/s)"
    old = figures["mesh_on_httpcore_pool"]["req_per_s"] / figures["bare"]["req_per_s"]
    versus_aiohttp = mesh / figures["aiohttp"]["req_per_s"]
    lines = [
        Line(
            "2",
            "async c=32: throughput mesh/bare httpx",
            f"{ratio:.2f}x {detail}",
            "≥ 3.0x",
            ratio >= 3.0,
        ),
        Line(
            "2b",
            "async c=32: throughput mesh/bare aiohttp",
            f"{versus_aiohttp:.2f}x (aiohttp {figures['aiohttp']['req_per_s']:.0f}/s)",
            "≥ 0.3x",
            versus_aiohttp >= 0.3,
        ),
        Line(
            "2",
            "  for comparison: mesh on httpx's own pool",
            f"{old:.2f}x ({figures['mesh_on_httpcore_pool']['req_per_s']:.0f}/s)",
            "(the old default)",
            None,
        ),
    ]
    return lines, {"row2_async_c32": figures}
