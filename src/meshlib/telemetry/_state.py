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
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.semconv.attributes.service_attributes import SERVICE_INSTANCE_ID

from .._config import MeshConfig
from .._version import __version__
from ._names import SERVICE_NAME, SERVICE_VERSION

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["STATE", "TelemetryState", "setup"]

logger = logging.getLogger("meshlib.telemetry")

_OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT",)


class TelemetryState:
    """Process-wide telemetry settings, read by the per-request hooks."""

    def __init__(self) -> None:
        #: this process's service (the source of its outbound calls); "" for a pure client
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


def _resource(config: MeshConfig) -> Resource:
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, str] = {}
    if config.service_name and not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = config.service_name
    if config.service_version:
        attributes[SERVICE_VERSION] = config.service_version
    # one per process, so the cumulative series of several workers of one service stay
    # apart (OTEL_RESOURCE_ATTRIBUTES may set its own)
    attributes[SERVICE_INSTANCE_ID] = f"{socket.gethostname()}:{os.getpid()}"
    return Resource.create(attributes)


def exporters_for(chosen: tuple[str, ...] | None, signal: str) -> tuple[str, ...]:
    """The exporters for a signal: as chosen, else ``otlp`` when an endpoint is set."""
    if chosen is not None:
        return tuple(name for name in chosen if name != "none")
    names = (*_OTLP_ENDPOINTS, f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    return ("otlp",) if any(os.environ.get(name) for name in names) else ()


def _install_tracing(config: MeshConfig) -> None:
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return  # the application installed its own: leave it alone
    names = exporters_for(config.traces_exporter, "traces")
    if not names:
        return
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=_resource(config))
    for name in names:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter()))
    trace.set_tracer_provider(provider)
    logger.info("tracing to %s", ", ".join(names))


def otlp_protocol(signal: str) -> str:
    """``grpc`` or ``http/protobuf`` (the default), from OpenTelemetry's variables."""
    return (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()


def _otlp_span_exporter() -> SpanExporter:
    if otlp_protocol("traces") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter()
