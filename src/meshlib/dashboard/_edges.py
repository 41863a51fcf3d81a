"""The service graph's edges from two scrapes of every admin listener, without Prometheus.

An edge is a caller -> callee pair of the client-side histogram
``http_client_request_duration_seconds`` (one observation per logical request; 5xx answers
and transport errors, which carry no status code, are errors). Between an older and a newer
scrape of each listener, the count's increase gives the request rate and the error rate, and
the buckets' increase gives p99 the way PromQL's ``histogram_quantile`` does (linear within
the bucket). A counter that went down was reset (the process restarted): its new value is
the increase, as with PromQL's ``rate``. ``total`` and ``errors`` are the newest counts
themselves, summed over the listeners: what a test that sent known traffic can compare.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from ..telemetry._exposition import Samples

__all__ = ["Scrape", "edges", "quantile"]

_METRIC = "http_client_request_duration_seconds"

#: admin listener URL -> its samples (None: the scrape failed)
Scrape = dict[str, Samples | None]


def _increase(new: float, old: float | None) -> float:
    if old is None or new < old:
        return new
    return new - old


class _Edge:
    __slots__ = ("buckets", "error_increase", "errors", "increase", "measured", "total")

    def __init__(self) -> None:
        self.total = 0.0
        self.errors = 0.0
        self.increase = 0.0
        self.error_increase = 0.0
        self.measured = False
        self.buckets: dict[float, float] = defaultdict(float)


def edges(newer: Scrape, older: Scrape | None, seconds: float) -> list[dict[str, Any]]:
    """Edges sorted by source then destination, each with ``rps``, ``error_rate`` (0-1 or
    None), ``p99_ms`` (or None), ``total`` and ``errors``."""
    found: dict[tuple[str, str], _Edge] = defaultdict(_Edge)
    for target, samples in newer.items():
        if samples is None:
            continue
        before = older.get(target) if older is not None else None
        for (name, labels), value in samples.items():
            if not name.startswith(_METRIC):
                continue
            tags = dict(labels)
            key = (tags.get("service_name", ""), tags.get("service_peer_name", ""))
            if not key[1]:
                continue
            edge = found[key]
            old = before.get((name, labels), 0.0) if before is not None else None
            if name == f"{_METRIC}_count":
                failed = tags.get("http_response_status_code", "")[:1] not in "1234" or not (
                    tags.get("http_response_status_code")
                )
                edge.total += value
                edge.errors += value if failed else 0.0
                if old is not None:
                    edge.measured = True
                    grown = _increase(value, old)
                    edge.increase += grown
                    edge.error_increase += grown if failed else 0.0
            elif name == f"{_METRIC}_bucket" and old is not None:
                edge.buckets[float(tags.get("le", "+Inf"))] += _increase(value, old)
    rows = []
    for (source, target), edge in sorted(found.items()):
        measured = edge.measured and seconds > 0
        p99 = quantile(0.99, edge.buckets)
        rows.append(
            {
                "source": source,
                "target": target,
                "rps": round(edge.increase / seconds, 3) if measured else None,
                "error_rate": (
                    round(edge.error_increase / edge.increase, 4)
                    if measured and edge.increase
                    else None
                ),
                "p99_ms": None if p99 is None else round(p99 * 1000, 2),
                "total": int(edge.total),
                "errors": int(edge.errors),
            }
        )
    return rows


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile(q, ...)`` over cumulative bucket counts keyed by upper bound."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    count = buckets[bounds[-1]]
    if count <= 0:
        return None
    rank = q * count
    lower, below = 0.0, 0.0
    for bound in bounds:
        cumulative = buckets[bound]
        if cumulative >= rank:
            if math.isinf(bound):
                return lower  # above the highest finite bound: Prometheus answers that bound
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower
