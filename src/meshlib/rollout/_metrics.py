"""Where the canary's success rate and latency come from: a ``MetricSource``.

The default reads Prometheus's HTTP API (``/api/v1/query``, ``/api/v1/targets``), over the
histogram every meshlib server exposes on ``/mesh/metrics``:
``http_server_request_duration_seconds``, labelled with ``service_name``,
``service_version`` and ``http_response_status_code``. Measuring the server side means the
canary is judged on every request it answered, from any caller, meshlib or not. Any object
with a ``measure`` method can stand in for it (a different metrics store, or a synthetic
check).

No data is not good data, so the counts are exact, not extrapolated:

* a window's count of a series is its newest sample minus its sample from the window's
  start (``m - m offset W``), over a window of at least four scrapes. ``increase(m[W])``
  is not used: it extrapolates from the samples inside the window, and it ignores a
  series' first sample, so the first 5xx of a canary that has just begun to fail (a series
  new in the window) counted as none: a canary answering 30% 500s passed a check at
  "success 100.00%". A series the window's start does not have is new: all of it counts.
* requests and errors come from one query, grouped by status code, so an error count is
  never missing while the request count is there;
* a check needs samples of each of the canary's targets from the window's start (``up``
  then), else it is inconclusive: a count that begins late is not the window's count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import httpx

from ..telemetry._names import (
    HTTP_RESPONSE_STATUS_CODE,
    SERVICE_NAME,
    SERVICE_VERSION,
    prometheus_name,
)
from ._consul import MetricsUnavailable, RolloutError
from ._state import Measurement

__all__ = ["MetricSource", "PrometheusSource", "ScrapedSource", "format_seconds"]

_HISTOGRAM = "http_server_request_duration_seconds"
_STATUS = prometheus_name(HTTP_RESPONSE_STATUS_CODE)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class MetricSource(Protocol):
    """Measures one version of a service over the last ``window`` seconds."""

    def measure(self, service: str, version: str, window: float) -> Measurement:
        """Requests, success rate (percent, no 5xx) and p99 latency (seconds).

        Raises ``MetricsUnavailable`` when it cannot tell (the check is then inconclusive).
        """
        ...


@runtime_checkable
class ScrapedSource(Protocol):
    """A ``MetricSource`` fed by scrapes: it can say how often each version is scraped."""

    def scrape_interval(self, service: str, instances: Mapping[str, Sequence[str]]) -> float:
        """The longest scrape interval of the targets of every version in ``instances``.

        ``instances`` maps a version to its instances' ``host:port``. Raises
        ``MetricsUnavailable`` when the source does not answer, ``RolloutError`` when a
        version has no target scraped.
        """
        ...


def format_seconds(seconds: float) -> str:
    """``250ms``, ``4s``, ``1m``, ``1m30s``: durations as the flags take them."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60 or seconds % 1:
        return f"{seconds:g}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m" + (f"{rest}s" if rest else "")


def _parse_prometheus_duration(text: str) -> float | None:
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS.get(u, 31536000.0) for n, u in parts)


def _host_port(url: str) -> str:
    parsed = httpx.URL(url)
    return f"{parsed.host}:{parsed.port}" if parsed.port else parsed.host


class PrometheusSource:
    """``MetricSource`` over Prometheus's HTTP API at ``url``."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=timeout)

    def queries(self, service: str, version: str, window: float) -> dict[str, str]:
        """The PromQL behind one measurement (also shown in the docs)."""
        selector = (
            f'{prometheus_name(SERVICE_NAME)}="{service}",'
            f'{prometheus_name(SERVICE_VERSION)}="{version}"'
        )
        offset = f"offset {max(round(window * 1000), 1)}ms"

        def delta(series: str) -> str:
            # the window's count of each series: newest minus the window's start, or all of
            # it when the start has none (new in the window) or more (a counter reset)
            return f"(({series} - {series} {offset}) >= 0 or {series})"

        count = f"{_HISTOGRAM}_count{{{selector}}}"
        bucket = f"{_HISTOGRAM}_bucket{{{selector}}}"
        return {
            "requests": f"sum by ({_STATUS}) ({delta(count)})",
            "p99": f"histogram_quantile(0.99, sum by (le) ({delta(bucket)}))",
            # the canary's targets that Prometheus had not scraped (up) at the window's start
            "late": (
                f"count(group by (job, instance) ({count}) "
                f"unless on (job, instance) (up {offset} == 1))"
            ),
            # the span the counts cover: the sample times they subtract
            "start": f"min(timestamp({count} {offset}))",
            "end": f"max(timestamp({count}))",
        }

    def measure(self, service: str, version: str, window: float) -> Measurement:
        """Query Prometheus; ``error`` says why the data cannot judge the window."""
        q = self.queries(service, version, window)
        by_status = self._vector(q["requests"])
        if not by_status:
            return Measurement(requests=0.0)
        late = self._scalar(q["late"])
        if late:
            return Measurement(
                requests=0.0,
                error=(
                    f"Prometheus has no scrape of {late:.0f} of {version}'s targets from the "
                    f"start of the {format_seconds(window)} window"
                ),
            )
        requests = sum(value for _, value in by_status)
        errors = sum(value for labels, value in by_status if labels.get(_STATUS, "")[:1] == "5")
        if requests <= 0:
            return Measurement(requests=0.0)
        p99 = self._scalar(q["p99"])
        return Measurement(
            requests=round(requests, 3),
            success_rate=round(max(0.0, 100.0 * (1.0 - errors / requests)), 3),
            p99=None if p99 is None or math.isnan(p99) else round(p99, 6),
            start=self._scalar(q["start"]),
            end=self._scalar(q["end"]),
        )

    def scrape_interval(self, service: str, instances: Mapping[str, Sequence[str]]) -> float:
        """The longest scrape interval of the targets of every version in ``instances``.

        A target is a version's when its address is one of the version's instances (as
        Consul has them), or when its series carry the version's label.
        """
        payload = self._get("/api/v1/targets", {"state": "active"})
        targets: list[dict[str, Any]] = payload.get("activeTargets") or []
        longest = 0.0
        for version, addresses in instances.items():
            labelled = {
                (labels.get("job", ""), labels.get("instance", ""))
                for labels, _ in self._vector(
                    f'group by (job, instance) ({{{prometheus_name(SERVICE_NAME)}="{service}",'
                    f'{prometheus_name(SERVICE_VERSION)}="{version}"}})'
                )
            }
            mine = [
                t
                for t in targets
                if _host_port(str(t.get("scrapeUrl", ""))) in addresses
                or (t.get("labels", {}).get("job"), t.get("labels", {}).get("instance")) in labelled
            ]
            up = [t for t in mine if t.get("health") == "up"]
            if not up:
                where = ", ".join(addresses) or "no instances in Consul"
                health = ", ".join(sorted({str(t.get("health")) for t in mine}))
                state = "scrapes none of them" if not mine else f"has them {health}, not up"
                raise RolloutError(
                    f"Prometheus at {self.url} {state}: the targets of {service} {version} "
                    f"({where}) must be scraped from /mesh/metrics (docs/rollouts.md)"
                )
            for target in up:
                text = str(target.get("scrapeInterval", ""))
                seconds = _parse_prometheus_duration(text)
                if seconds is None:
                    raise RolloutError(
                        f"Prometheus at {self.url} does not report the scrape interval of "
                        f"{target.get('scrapeUrl')} (got {text!r})"
                    )
                longest = max(longest, seconds)
        return longest

    def _get(self, path: str, params: dict[str, str]) -> Any:
        try:
            response = self._client.get(path, params=params)
            payload = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise MetricsUnavailable(f"cannot query Prometheus at {self.url}: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("status") != "success":
            error = payload.get("error") if isinstance(payload, dict) else payload
            asked = " ".join(f"{k}={v}" for k, v in params.items())
            raise MetricsUnavailable(f"Prometheus at {self.url} refused {path}?{asked}: {error}")
        return payload["data"]

    def _vector(self, promql: str) -> list[tuple[dict[str, str], float]]:
        result = self._get("/api/v1/query", {"query": promql})["result"]
        return [(item["metric"], float(item["value"][1])) for item in result]

    def _scalar(self, promql: str) -> float | None:
        result = self._vector(promql)
        return result[0][1] if result else None

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()
