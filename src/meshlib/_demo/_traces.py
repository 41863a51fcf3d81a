"""An OTLP/HTTP trace receiver in the demo process, and the span tree of one trace."""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["SpanRecord", "TraceReceiver", "span_tree"]

_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT"}


@dataclass(frozen=True)
class SpanRecord:
    """One received span."""

    service: str
    #: the instrumentation scope: "meshlib" for the mesh's own spans
    scope: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    start: int
    end: int
    attributes: dict[str, Any]


class TraceReceiver:
    """``POST /v1/traces`` (protobuf, as the SDK's OTLP/HTTP exporter sends) on loopback."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self._spans: list[SpanRecord] = []
        self._lock = threading.Lock()
        reply = ExportTraceServiceResponse().SerializeToString()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                receiver._add(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="meshlib-demo-otlp", daemon=True
        )
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """The value for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _add(self, request: Any) -> None:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    kv.value.string_value
                    for kv in resource_spans.resource.attributes
                    if kv.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                scope = scope_spans.scope.name
                records = [_record(service, scope, span) for span in scope_spans.spans]
                with self._lock:
                    self._spans.extend(records)

    def trace(self, trace_id: str) -> list[SpanRecord]:
        """The spans received so far of one trace."""
        with self._lock:
            return [s for s in self._spans if s.trace_id == trace_id]

    def close(self) -> None:
        """Stop listening."""
        self._server.shutdown()
        self._server.server_close()


def _record(service: str, scope: str, span: Any) -> SpanRecord:
    attributes = {}
    for kv in span.attributes:
        which = kv.value.WhichOneof("value")
        if which is not None:
            attributes[kv.key] = getattr(kv.value, which)
    return SpanRecord(
        service=service,
        scope=scope,
        name=span.name,
        kind=_KINDS.get(span.kind, "?"),
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_id=span.parent_span_id.hex(),
        start=span.start_time_unix_nano,
        end=span.end_time_unix_nano,
        attributes=attributes,
    )


def span_tree(spans: list[SpanRecord], scope: str = "meshlib") -> list[str]:
    """The spans of ``scope`` as an indented tree, one line each, children in start order.

    A span of another scope (a framework's own) is left out, and its children hang from
    its nearest ancestor that is shown.
    """
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[SpanRecord]] = {}
    for span in spans:
        if span.scope != scope:
            continue
        parent = by_id.get(span.parent_id)
        while parent is not None and parent.scope != scope:
            parent = by_id.get(parent.parent_id)
        children.setdefault(parent.span_id if parent else "", []).append(span)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start):
            took = (span.end - span.start) / 1e6
            where = span.attributes.get("server.port")
            extra = f" -> :{where}" if where and span.kind == "CLIENT" else ""
            lines.append(
                f"{'  ' * depth}{span.service:<9} {span.kind:<8} {span.name}{extra}  {took:.1f} ms"
            )
            walk(span.span_id, depth + 1)

    walk("", 0)
    return lines
