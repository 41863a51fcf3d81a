"""Where the canary's success rate and latency come from: a ``MetricSource``.

The default reads Prometheus's HTTP API (``/api/v1/query``), over the histogram every
meshlib server exposes on ``/mesh/metrics``: ``http_server_request_duration_seconds``,
labelled with ``service_name``, ``service_version`` and ``http_response_status_code``.
Measuring the server side means the canary is judged on every request it answered, from
any caller, meshlib or not. Any object with a ``measure`` method can stand in for it (a
different metrics store, or a synthetic check).
"""

from __future__ import annotations

import math
from typing import Protocol

import httpx

from ..telemetry._names import (
    HTTP_RESPONSE_STATUS_CODE,
    SERVICE_NAME,
    SERVICE_VERSION,
    prometheus_name,
)
from ._consul import MetricsUnavailable
from ._state import Measurement

__all__ = ["MetricSource", "PrometheusSource"]

_HISTOGRAM = "http_server_request_duration_seconds"


class MetricSource(Protocol):
    """Measures one version of a service over the last ``window`` seconds."""

    def measure(self, service: str, version: str, window: float) -> Measurement:
        """Requests, success rate (percent, no 5xx) and p99 latency (seconds).

        Raises ``MetricsUnavailable`` when it cannot tell (the check is then inconclusive).
        """
        ...


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
        errors = f'{selector},{prometheus_name(HTTP_RESPONSE_STATUS_CODE)}=~"5.."'
        rng = f"[{max(round(window * 1000), 1)}ms]"
        return {
            "requests": f"sum(increase({_HISTOGRAM}_count{{{selector}}}{rng}))",
            "errors": f"sum(increase({_HISTOGRAM}_count{{{errors}}}{rng}))",
            "p99": (
                f"histogram_quantile(0.99, sum by (le) "
                f"(rate({_HISTOGRAM}_bucket{{{selector}}}{rng})))"
            ),
        }

    def measure(self, service: str, version: str, window: float) -> Measurement:
        """Query Prometheus; no requests in the window gives ``requests == 0``."""
        q = self.queries(service, version, window)
        requests = self._scalar(q["requests"]) or 0.0
        if requests <= 0:
            return Measurement(requests=0.0)
        errors = self._scalar(q["errors"]) or 0.0
        p99 = self._scalar(q["p99"])
        return Measurement(
            requests=round(requests, 3),
            success_rate=round(max(0.0, 100.0 * (1.0 - errors / requests)), 3),
            p99=None if p99 is None or math.isnan(p99) else round(p99, 6),
        )

    def _scalar(self, promql: str) -> float | None:
        try:
            response = self._client.get("/api/v1/query", params={"query": promql})
            payload = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise MetricsUnavailable(f"cannot query Prometheus at {self.url}: {exc}") from exc
        if payload.get("status") != "success":
            raise MetricsUnavailable(
                f"Prometheus at {self.url} refused {promql}: {payload.get('error')}"
            )
        result = payload["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()
