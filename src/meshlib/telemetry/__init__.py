"""Telemetry: traces, metrics and access logs for both directions of the mesh.

The request paths call in through thin, failsafe hooks: ``OutboundTelemetry`` (one per
outbound logical request, held by the pipeline's ``Call``) and the ``asgi()`` / ``wsgi()``
wrappers the middlewares put around their request handling. The rest lives here:

* ``_state``: the process's setup from ``MeshConfig`` and the ``OTEL_*`` variables;
* ``_metrics`` / ``_instruments``: fixed-bucket instruments and the metric reference;
* ``_export``: OTLP metric push and the opt-in Prometheus listener (``MESH_METRICS_ADDR``);
* ``_access``: JSON access log lines;
* ``_top``: ``meshlib top``, the service graph from Prometheus in a terminal;
* ``_exposition``: the Prometheus text format read back (the dashboard's and the rollout's
  scrapes of ``/mesh/metrics``).

``meshlib_certificate_expiry_seconds`` is read from the security layer's current TLS
material at each scrape; ``record_certificate_expiry`` publishes other certificates.
"""

from __future__ import annotations

from ._inbound import asgi, wsgi
from ._instruments import CERTIFICATE_EXPIRY
from ._metrics import REGISTRY
from ._outbound import OutboundTelemetry
from ._state import STATE, setup

__all__ = [
    "OutboundTelemetry",
    "asgi",
    "prometheus_text",
    "record_certificate_expiry",
    "setup",
    "wsgi",
]


def prometheus_text() -> str:
    """Every meshlib metric of this process in the Prometheus text format."""
    return REGISTRY.prometheus_text()


def record_certificate_expiry(not_after: float, service: str | None = None) -> None:
    """Publish that this process's mesh certificate expires at ``not_after`` (Unix time)."""
    CERTIFICATE_EXPIRY.set((service if service is not None else STATE.source,), not_after)
