"""Getting metrics out: the OTLP push and the opt-in Prometheus listener.

* **OTLP**: when ``OTEL_METRICS_EXPORTER`` says ``otlp`` (or is unset and an OTLP endpoint
  is), a daemon thread hands the registry's cumulative values to the SDK's OTLP metric
  exporter every ``OTEL_METRIC_EXPORT_INTERVAL`` milliseconds (60 s by default) and once
  more at exit. ``console`` prints them the same way. The request path is not involved.
* **the admin listener** (``MESH_ADMIN_ADDR=host:port``, ``_admin.py``) of a process that
  calls services but serves no app of their own: ``/metrics`` and ``/mesh/metrics`` for
  Prometheus, ``/mesh/status`` for ``meshlib status``. A server opens its own when it starts.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any

from .._config import MeshConfig
from .._version import __version__
from ._admin import serve_admin
from ._metrics import REGISTRY, Counter, Gauge, Histogram, Registry
from ._metrics import Exemplar as ExemplarData
from ._names import SERVICE_NAME
from ._otel import exporters_for, otlp_protocol, resource

__all__ = ["otlp_metrics", "start_exporters"]

logger = logging.getLogger("meshlib.telemetry")


#: (exporter name, config) of every push started: restarted in a forked child
_PUSHES: list[tuple[str, MeshConfig]] = []


def start_exporters(config: MeshConfig) -> None:
    """Start what ``config`` and the ``OTEL_*`` variables ask for (once per process)."""
    for name in exporters_for(config.metrics_exporter, "metrics"):
        if _start_push(name, config):
            _PUSHES.append((name, config))
    # under `meshlib serve` the serving processes open it themselves (a pre-forking
    # server's parent must not answer for its workers)
    if config.admin_addr is not None and "MESHLIB_SERVE_TARGET" not in os.environ:
        serve_admin(*config.admin_addr)


def _start_push(name: str, config: MeshConfig) -> bool:
    exporter = _metric_exporter(name)
    if exporter is None:
        return False
    _Pusher(exporter, config).start()
    return True


def _restart_in_child() -> None:
    """Threads do not survive ``fork`` (gunicorn forks its workers after loading the app):
    each worker pushes its own metrics, with a fresh exporter and thread."""
    for name, config in _PUSHES:
        try:
            _start_push(name, config)
        except Exception:
            logger.exception("restarting the metrics push after fork failed")


os.register_at_fork(after_in_child=_restart_in_child)


def _metric_exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if name != "otlp":
        return None
    if otlp_protocol("metrics") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HTTPMetricExporter,
    )

    return HTTPMetricExporter()


class _Pusher(threading.Thread):
    def __init__(self, exporter: Any, config: MeshConfig) -> None:
        super().__init__(name="meshlib-metrics-push", daemon=True)
        self._exporter = exporter
        self._config = config
        interval = os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")
        try:
            self._interval = max(float(interval) / 1000, 0.1)
        except ValueError:
            self._interval = 60.0
        self._stop = threading.Event()
        self._pid = os.getpid()
        atexit.register(self._final)

    def run(self) -> None:
        while not self._stop.wait(self._interval):
            self._push()

    def _push(self) -> None:
        try:
            self._exporter.export(otlp_metrics(REGISTRY, self._config))
        except Exception:
            logger.exception("exporting metrics failed")

    def _final(self) -> None:
        if os.getpid() != self._pid:
            return  # registered by the parent of a forked worker: not this process's push
        self._stop.set()
        self._push()


def otlp_metrics(registry: Registry, config: MeshConfig) -> Any:
    """The registry as the SDK's ``MetricsData`` (cumulative), for its exporters."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
    )
    from opentelemetry.sdk.metrics.export import Gauge as GaugeData
    from opentelemetry.sdk.metrics.export import Histogram as HistogramData
    from opentelemetry.sdk.metrics.export import Sum as SumData
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    start, now = registry.started_ns, time.time_ns()
    cumulative = AggregationTemporality.CUMULATIVE
    metrics: list[Metric] = []
    for metric in registry.metrics:
        data: Any
        if isinstance(metric, Histogram):
            traced = metric.collect_exemplars()
            points = [
                HistogramDataPoint(
                    attributes=_attributes(metric.keys, labels),
                    start_time_unix_nano=start,
                    time_unix_nano=now,
                    count=count,
                    sum=total,
                    bucket_counts=buckets,
                    explicit_bounds=metric.bounds,
                    min=low,
                    max=high,
                    exemplars=_exemplars(traced.get(labels)),
                )
                for labels, buckets, count, total, low, high in metric.collect()
            ]
            data = HistogramData(data_points=points, aggregation_temporality=cumulative)
        else:
            numbers = [
                NumberDataPoint(
                    attributes=_attributes(metric.keys, labels),
                    start_time_unix_nano=start,
                    time_unix_nano=now,
                    value=value,
                )
                for labels, value in metric.collect()
            ]
            if isinstance(metric, Counter):
                data = SumData(
                    data_points=numbers, aggregation_temporality=cumulative, is_monotonic=True
                )
            else:
                assert isinstance(metric, Gauge)
                data = GaugeData(data_points=numbers)
        if data.data_points:
            metrics.append(Metric(metric.name, metric.description, metric.unit, data))
    scope = ScopeMetrics(InstrumentationScope("meshlib", __version__), metrics, "")
    return MetricsData([ResourceMetrics(resource(config), [scope], "")])


def _exemplars(traced: list[ExemplarData | None] | None) -> list[Any]:
    """A data point's exemplars (the latest traced observation per bucket), for the SDK."""
    if not traced:
        return []
    from opentelemetry.sdk.metrics import Exemplar

    return [
        Exemplar({}, value, int(at * 1e9), span_id=int(span_id, 16), trace_id=int(trace_id, 16))
        for trace_id, span_id, value, at in (e for e in traced if e is not None)
    ]


def _attributes(keys: tuple[str, ...], labels: tuple[str, ...]) -> dict[str, str]:
    # service.name is the resource's (it names the process); a data point does not repeat it
    return {
        key: value
        for key, value in zip(keys, labels, strict=True)
        if value != "" and key != SERVICE_NAME
    }
