"""``nox -s bench``: what the mesh costs, as ratios measured in one run on loopback.

    python bench/perf.py [--quick] [--json bench-results.json] [--rows 1,3b,7]

Prints one table, each figure beside its goal, and writes the raw numbers with the machine
they came from to a JSON file (gitignored). ``--quick`` runs every row briefly, to prove it
runs (CI); its figures are too short to quote. Goals live here and in docs/performance.md,
never in test assertions.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import ROOT, Line, machine, pin_client, print_table, write_json

from meshlib._runtime import live_meshes

Row = Callable[[bool], tuple[list[Line], dict[str, Any]]]


#: row -> (module, function): imported when the row runs, so one row can run alone.
ROWS = {
    "1": ("overhead", "sync_overhead"),
    "2": ("overhead", "async_throughput"),
    "3": ("sidecar", "mtls_vs_sidecar"),
    "3b": ("sidecar", "mtls_vs_sidecar_async"),
    "4": ("balance", "slow_backend_p99"),
    "5": ("consul_cost", "idle_cost"),
    "6": ("consul_cost", "scale"),
    "7": ("serving", "serve_vs_uvicorn"),
    "8": ("consul_faults", "restarts"),
    "9": ("consul_faults", "leader_loss"),
}


def _row(key: str) -> Row:
    import importlib

    module, function = ROWS[key]
    row: Row = getattr(importlib.import_module(module), function)
    return row


def main() -> None:
    """Run the rows asked for, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every row briefly (CI)")
    parser.add_argument(
        "--json", type=Path, help="where the raw figures go (bench-results[-quick].json)"
    )
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row numbers")
    args = parser.parse_args()
    if args.json is None:
        args.json = ROOT / ("bench-results-quick.json" if args.quick else "bench-results.json")
    pinning = pin_client()
    print(f"meshlib benchmark ({'quick' if args.quick else 'full'}); {pinning}")
    print(f"load average before: {machine()['load_average']}")
    lines: list[Line] = []
    raw: dict[str, Any] = {"mode": "quick" if args.quick else "full", "pinning": pinning}
    for key in args.rows.split(","):
        started = time.monotonic()
        load_before = os.getloadavg()[0]
        got, figures = _row(key.strip())(args.quick)
        load = max(load_before, os.getloadavg()[0])
        for line in got:
            line.load = load
        # a row's meshes (watches, TLS renewal) stop with it
        for mesh in live_meshes():
            mesh.close()
        lines += got
        raw.update(figures)
        print(f"row {key}: {time.monotonic() - started:.0f} s", flush=True)
    print_table("meshlib benchmark: ratios from one run", lines)
    print(f"load average after: {os.getloadavg()}")
    write_json(args.json, raw, lines)


if __name__ == "__main__":
    main()
