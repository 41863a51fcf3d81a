"""OpenTelemetry's own variables, read as the SDK documents them, and this process's resource.

Shared by the tracing setup (``_state``) and the metric exporters (``_export``): which
exporters a signal gets (``OTEL_{TRACES,METRICS}_EXPORTER``, else ``otlp`` when an OTLP
endpoint is set), which OTLP protocol, and the resource that names the process.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from opentelemetry.semconv.attributes.service_attributes import SERVICE_INSTANCE_ID

from .._config import MeshConfig
from ._names import SERVICE_NAME, SERVICE_VERSION

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

__all__ = ["exporters_for", "otlp_protocol", "resource"]

_OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT",)


def resource(config: MeshConfig) -> Resource:
    """This process as OpenTelemetry names it: service name, version and instance."""
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


def otlp_protocol(signal: str) -> str:
    """``grpc`` or ``http/protobuf`` (the default), from OpenTelemetry's variables."""
    return (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
