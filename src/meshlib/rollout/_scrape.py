"""Rollout metrics without Prometheus: the instances' own ``/mesh/metrics``, scraped on demand.

``AdminScrapeSource`` is a ``MetricSource`` and a ``ScrapedSource`` (``_metrics``). It reads
the same histogram Prometheus would (``http_server_request_duration_seconds``, labelled
with the service, its version and the status code) from the admin listener of each
instance of the version, and counts a window the way ``PrometheusSource`` does, exactly:

* the preflight (``scrape_interval``) scrapes every instance of both versions once: an
  instance that does not answer stops the rollout before any weight moves, in one line;
  those scrapes are also the first window's start. The instances are the ones the
  control plane listed then;
* each check scrapes the canary's instances and subtracts the newest earlier scrape taken
  at least ``window`` before (a series that scrape lacks, or that went down, a restart,
  counts whole, as the PromQL's ``or`` does). With no scrape that old yet (a controller
  that has just resumed), the check waits until the first one is a window old: a count
  that begins late is not the window's count;
* an instance that does not answer a check's scrape makes the check inconclusive
  (``MetricsUnavailable``), never a pass;
* p99 is interpolated within the histogram's buckets, as ``histogram_quantile`` does.

There is no scrape interval: the counts are taken at each check, so ``--interval`` and
``--window`` need not span several scrapes (``scrape_interval`` returns 0).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import httpx

from ..telemetry._exposition import Samples, parse
from ..telemetry._names import (
    HTTP_RESPONSE_STATUS_CODE,
    SERVICE_NAME,
    SERVICE_VERSION,
    prometheus_name,
)
from ._consul import MetricsUnavailable, RolloutError
from ._state import Measurement

__all__ = ["AdminScrapeSource", "quantile"]

_COUNT = "http_server_request_duration_seconds_count"
_BUCKET = "http_server_request_duration_seconds_bucket"
_SERVICE = prometheus_name(SERVICE_NAME)
_VERSION = prometheus_name(SERVICE_VERSION)
_STATUS = prometheus_name(HTTP_RESPONSE_STATUS_CODE)
#: A scrape up to this share of the window late still starts it (checks drift by the time
#: a check takes).
_SLACK = 0.05

#: (time, address -> the version's samples there)
Scrape = tuple[float, dict[str, Samples]]


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``histogram_quantile(q, ...)`` over cumulative ``buckets`` (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # the highest finite bound, as Prometheus answers
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


class AdminScrapeSource:
    """``MetricSource`` over the instances' admin listeners (``/mesh/metrics``)."""

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = httpx.Client(timeout=timeout)
        self._clock = clock
        self._sleep = sleep
        #: (service, version) -> its instances' admin addresses (from the preflight)
        self._targets: dict[tuple[str, str], list[str]] = {}
        self._history: dict[tuple[str, str], list[Scrape]] = defaultdict(list)

    def scrape_interval(self, service: str, instances: Mapping[str, Sequence[str]]) -> float:
        """Scrape every instance of every version once (the first window's start); 0.0.

        ``RolloutError`` names a version without instances, or an instance that does not
        serve ``/mesh/metrics``.
        """
        for version, addresses in instances.items():
            if not addresses:
                raise RolloutError(
                    f"no instances of {service} {version} to read /mesh/metrics from"
                )
            self._targets[(service, version)] = list(addresses)
            try:
                self._history[(service, version)].append(self._scrape(service, version))
            except MetricsUnavailable as exc:
                raise RolloutError(
                    f"{exc}: each instance must serve /mesh/metrics there (in the local "
                    "config file, give it meta.admin-port, its MESH_ADMIN_ADDR port)"
                ) from None
        return 0.0

    def measure(self, service: str, version: str, window: float) -> Measurement:
        """The version's requests, success rate and p99 over the last ``window`` seconds."""
        key = (service, version)
        history = self._history[key]
        if key not in self._targets:
            raise MetricsUnavailable(f"no instances of {service} {version} known to scrape")
        now = self._clock()
        if not history:
            history.append(self._scrape(service, version))
        if now - history[0][0] < window * (1 - _SLACK):
            self._sleep(history[0][0] + window - now)  # a window must be covered whole
        newest = self._scrape(service, version)
        base = max(
            (s for s in history if s[0] <= newest[0] - window * (1 - _SLACK)),
            key=lambda s: s[0],
        )
        history.append(newest)
        # keep the scrapes a later window may start at: the base and everything after it
        history[:] = [s for s in history if s[0] >= base[0]]
        return self._count(service, version, base, newest)

    def _count(self, service: str, version: str, base: Scrape, newest: Scrape) -> Measurement:
        by_status: dict[str, float] = defaultdict(float)
        buckets: dict[float, float] = defaultdict(float)
        for address, samples in newest[1].items():
            before = base[1].get(address, {})
            for (name, labels), value in samples.items():
                old = before.get((name, labels))
                delta = value - old if old is not None and value >= old else value
                label = dict(labels)
                if name == _COUNT:
                    by_status[label.get(_STATUS, "")] += delta
                elif name == _BUCKET:
                    buckets[float(label.get("le", "+Inf"))] += delta
        requests = sum(by_status.values())
        if requests <= 0:
            return Measurement(requests=0.0, start=base[0], end=newest[0])
        errors = sum(v for status, v in by_status.items() if status[:1] == "5")
        p99 = quantile(0.99, buckets)
        return Measurement(
            requests=round(requests, 3),
            success_rate=round(max(0.0, 100.0 * (1.0 - errors / requests)), 3),
            p99=None if p99 is None else round(p99, 6),
            start=base[0],
            end=newest[0],
        )

    def _scrape(self, service: str, version: str) -> Scrape:
        """Every instance of the version, now: its samples of the version's histogram."""
        found: dict[str, Samples] = {}
        at = self._clock()
        for address in self._targets[(service, version)]:
            url = f"http://{address}/mesh/metrics"
            try:
                response = self._client.get(url)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                raise MetricsUnavailable(
                    f"cannot read {url} ({service} {version}): {type(exc).__name__}: {exc}"
                ) from None
            found[address] = {
                (name, labels): value
                for (name, labels), value in parse(response.text).items()
                if name in (_COUNT, _BUCKET)
                and (_SERVICE, service) in labels
                and (_VERSION, version) in labels
            }
        return at, found

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()
