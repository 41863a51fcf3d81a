"""The inbound pipeline, written once for the ASGI and the WSGI middleware.

Before the application sees a request:

1. **reserved routes** under ``/mesh/``: health (for Consul's check and for load
   balancers), metrics and status (``_status.py``), answered by the mesh itself;
2. **authorization**: the caller's identity comes from its verified client certificate
   (``InboundRequest.peer``, set by the server, never from a header); the authorizer
   (local allow/deny lists, Consul intentions) may answer 403;
3. **deadline**: a caller whose ``x-mesh-deadline-ms`` budget is already gone gets 504
   without the handler running (nobody is waiting for that answer any more); otherwise
   the remaining budget caps the handler's own outbound calls;
4. **stages**: plug points, in order, for peer identity, authorization, rate and
   concurrency limits and fault injection (filled by the features that need them). The
   first stage that answers (403, 429, ...) ends the request before the handler.

Everything here is sans-IO: the middlewares translate their protocol to ``InboundRequest``
and a ``LocalResponse`` back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from .. import __version__
from .._status import LOOPBACK, status_report
from ..resilience._deadline import DEADLINE_HEADER, Deadline, parse_deadline_header
from ..security import Authorizer, SpiffeId
from ..telemetry import prometheus_text
from ._instance import Instance

logger = logging.getLogger("meshlib.server")

__all__ = ["RESERVED_PREFIX", "Inbound", "InboundRequest", "LocalResponse", "Stage"]

RESERVED_PREFIX = "/mesh/"


class LocalResponse(NamedTuple):
    """A response the mesh gives itself, without the application."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class InboundRequest(NamedTuple):
    """What inbound stages see of a request."""

    method: str
    path: str
    #: Lower-cased header names; the last value of a repeated header.
    headers: Mapping[str, str]
    #: The caller's identity from its verified client certificate; None for plaintext.
    peer: SpiffeId | None = None


#: An inbound stage: a LocalResponse ends the request, None lets it through.
Stage = Callable[[InboundRequest], "LocalResponse | None"]


def json_response(status: int, payload: object) -> LocalResponse:
    """A small JSON answer."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return LocalResponse(
        status,
        (("content-type", "application/json"), ("content-length", str(len(body)))),
        body,
    )


class Inbound:
    """Decides, per request, whether the application runs and with what deadline."""

    def __init__(
        self,
        instance: Instance,
        stages: Sequence[Stage] = (),
        authorizer: Authorizer | None = None,
    ) -> None:
        self.instance = instance
        self.stages = tuple(stages)
        self.authorizer = authorizer

    def reserved(self, method: str, path: str, client: str | None = None) -> LocalResponse:
        """Answer a request under ``/mesh/`` (``client``: the caller's IP address)."""
        instance = self.instance
        if path in ("/mesh/health", "/mesh/health/ready"):
            config = instance.config
            payload = {
                "status": instance.state,
                "service": config.service_name,
                "version": config.service_version,
                "in_flight": instance.in_flight,
                "meshlib": __version__,
            }
            return json_response(200 if instance.ready else 503, payload)
        if path == "/mesh/health/live":
            return json_response(200, {"status": "alive"})
        if path == "/mesh/metrics":
            return _metrics(instance)
        if path == "/mesh/status":
            if not client or not client.startswith(LOOPBACK):
                return json_response(
                    403, {"error": "/mesh/status lists internal addresses: loopback callers only"}
                )
            return json_response(200, status_report())
        return json_response(404, {"error": f"no mesh route {path}"})

    def admit(self, request: InboundRequest) -> LocalResponse | Deadline | None:
        """A LocalResponse to send instead of running the app, or the request's deadline."""
        if self.authorizer is not None:
            decision = self.authorizer.decide(
                request.peer, request.method, request.path, dict(request.headers)
            )
            if not decision.allowed:
                logger.warning(
                    "denied %s %s from %s to %s: %s",
                    request.method,
                    request.path,
                    request.peer or "an unidentified caller",
                    self.instance.config.service_name,
                    decision.reason,
                )
                return json_response(403, {"error": "forbidden", "detail": decision.reason})
        budget = parse_deadline_header(request.headers.get(DEADLINE_HEADER))
        if budget is not None and budget <= 0:
            return json_response(
                504,
                {
                    "error": "deadline exceeded",
                    "detail": f"the caller's deadline ({DEADLINE_HEADER}: 0) had passed "
                    "before the request was handled",
                },
            )
        for stage in self.stages:
            answer = stage(request)
            if answer is not None:
                return answer
        return None if budget is None else Deadline.after(budget)


def _metrics(instance: Instance) -> LocalResponse:
    service = (instance.config.service_name or "").replace('"', "")
    lines = [
        "# HELP meshlib_inbound_requests_in_flight Requests this instance is handling.",
        "# TYPE meshlib_inbound_requests_in_flight gauge",
        f'meshlib_inbound_requests_in_flight{{service="{service}"}} {instance.in_flight}',
        "# HELP meshlib_ready 1 while this instance is ready to receive traffic.",
        "# TYPE meshlib_ready gauge",
        f'meshlib_ready{{service="{service}"}} {1 if instance.ready else 0}',
    ]
    body = ("\n".join(lines) + "\n" + prometheus_text()).encode()
    return LocalResponse(200, (("content-type", "text/plain; version=0.0.4; charset=utf-8"),), body)
