"""The process's telemetry setup: who we are, where traces go, whether access logs are on.

``setup(config)`` runs when a client transport or a middleware is built; it is idempotent
and cheap after the first call. Tracing follows OpenTelemetry's own rules:

* an application that installed its own tracer provider is left alone: meshlib's spans go
  to it (checked on every request, so a provider installed after the first client is
  picked up too);
* otherwise meshlib installs the SDK's ``TracerProvider`` when ``OTEL_TRACES_EXPORTER``
  names an exporter (``otlp``, ``console``), or when it is unset and an OTLP endpoint is
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``). The exporter,
  the sampler, the batch processor and the resource read their ``OTEL_*`` variables as the
  SDK documents them;
* with no provider at all, meshlib creates no spans but still carries an incoming
  ``traceparent`` on to the calls a handler makes, so a service without tracing does not
  break the trace of the services around it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from opentelemetry import trace

from .._config import MeshConfig
from .._version import __version__
from ._otel import exporters_for, otlp_protocol, resource

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["STATE", "TelemetryState", "setup"]

logger = logging.getLogger("meshlib.telemetry")


class TelemetryState:
    """Process-wide telemetry settings, read by the per-request hooks."""

    def __init__(self) -> None:
        #: this process's service, for its process-wide series (build info, the server
        #: counters' zeros); a request's own telemetry is labelled with its mesh's service
        self.source = ""
        self.version = ""
        self.access_log = False
        #: opt-in unbounded metric labels (MESH_METRICS_LABELS): "endpoint", "path"
        self.endpoint_label = False
        self.path_label = False
        #: this process serves inbound requests (the server counters start at zero)
        self.serving = False
        self._next_check = 0.0
        self._tracer: trace.Tracer | None = None
        self._lock = threading.Lock()
        self._configured: list[MeshConfig] = []
        self._installed = False

    def tracer(self) -> trace.Tracer | None:
        """meshlib's tracer, or None when no tracer provider is installed.

        A provider, once installed, is final (OpenTelemetry refuses to replace it), so it
        is looked up once; while there is none, at most once a second (the lookup reads
        the environment: ~2 µs, too much for every request).
        """
        if self._tracer is not None:
            return self._tracer
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + 1.0
        provider = trace.get_tracer_provider()
        if not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            self._tracer = provider.get_tracer("meshlib", __version__)
        return self._tracer


STATE = TelemetryState()


def setup(config: MeshConfig) -> None:
    """Apply ``config``'s telemetry settings to the process (idempotent; failsafe)."""
    if config in STATE._configured:
        return
    with STATE._lock:
        if config in STATE._configured:
            return
        STATE._configured.append(config)
        if config.service_name:
            STATE.source = config.service_name
            STATE.version = config.service_version or ""
        STATE.access_log = config.access_log == "json"
        STATE.endpoint_label |= "endpoint" in config.metrics_labels
        STATE.path_label |= "path" in config.metrics_labels
        install = not STATE._installed
        STATE._installed = True
    try:
        if STATE.access_log:
            from ._access import install_handler

            install_handler(config.access_log_file)
        if install:
            _install_tracing(config)
            from ._export import start_exporters

            start_exporters(config)
    except Exception:  # telemetry must never stop the application
        logger.exception("setting up telemetry failed; continuing without it")


def _install_tracing(config: MeshConfig) -> None:
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return  # the application installed its own: leave it alone
    names = exporters_for(config.traces_exporter, "traces")
    if not names:
        return
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=resource(config))
    for name in names:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter()))
    trace.set_tracer_provider(provider)
    logger.info("tracing to %s", ", ".join(names))


def _otlp_span_exporter() -> SpanExporter:
    if otlp_protocol("traces") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter()
