"""A real OTLP/HTTP receiver for the tests: decodes the protobuf the SDK's exporters send."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span


class Received:
    """One exported span with the service that sent it."""

    def __init__(self, service: str, scope: str, span: Span) -> None:
        self.service = service
        #: the instrumentation scope: "meshlib" for meshlib's own spans
        self.scope = scope
        self.name = span.name
        self.kind = span.kind
        self.trace_id = span.trace_id.hex()
        self.span_id = span.span_id.hex()
        self.parent_id = span.parent_span_id.hex()
        self.attributes: dict[str, Any] = {}
        for kv in span.attributes:
            value = kv.value
            self.attributes[kv.key] = getattr(value, value.WhichOneof("value"))
        self.events = [event.name for event in span.events]

    def __repr__(self) -> str:
        return f"<{self.service} {self.name} {self.span_id} parent={self.parent_id}>"


class OtlpReceiver:
    """``POST /v1/traces`` and ``/v1/metrics`` on a free loopback port."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.metric_names: set[str] = set()
        #: (service.name, metric name) pairs received
        self.metrics_by_service: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    receiver._traces(body)
                elif self.path == "/v1/metrics":
                    receiver._metrics(body)
                else:
                    self.send_error(404)
                    return
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _traces(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            service = _service(resource_spans.resource)
            for scope_spans in resource_spans.scope_spans:
                with self._lock:
                    self.spans.extend(
                        Received(service, scope_spans.scope.name, s) for s in scope_spans.spans
                    )

    def _metrics(self, body: bytes) -> None:
        request = ExportMetricsServiceRequest.FromString(body)
        for resource_metrics in request.resource_metrics:
            service = _service(resource_metrics.resource)
            for scope_metrics in resource_metrics.scope_metrics:
                with self._lock:
                    self.metric_names.update(m.name for m in scope_metrics.metrics)
                    self.metrics_by_service.update((service, m.name) for m in scope_metrics.metrics)

    def trace(self, trace_id: str, scope: str | None = "meshlib") -> list[Received]:
        """The spans of one trace made by instrumentation ``scope`` (None: all)."""
        with self._lock:
            return [
                s
                for s in self.spans
                if s.trace_id == trace_id and (scope is None or s.scope == scope)
            ]


def _service(resource: Any) -> str:
    return next(
        (kv.value.string_value for kv in resource.attributes if kv.key == "service.name"), ""
    )


@pytest.fixture(scope="module")
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    receiver.thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
