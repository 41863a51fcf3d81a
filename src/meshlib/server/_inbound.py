"""The inbound pipeline, written once for the ASGI and the WSGI middleware.

Before the application sees a request:

1. **reserved routes** under ``/mesh/``: 404 on the app's port. Health (for Consul's
   check, probes and load balancers), metrics and status (``_status.py``) are answered by
   ``reserved`` on the admin listener (``telemetry/_admin.py``, ``MESH_ADMIN_ADDR``), never
   through the app's port, and never limited, so an overloaded instance is not also
   marked dead;
2. **authorization**: the caller's identity comes from its verified client certificate
   (``InboundRequest.peer``, set by the server, never from a header); the authorizer
   (local allow/deny lists, Consul intentions) may answer 403. First, so a denied caller
   costs no rate-limit token;
3. **deadline**: a caller whose ``x-mesh-deadline-ms`` budget is already gone gets 504
   without the handler running (nobody is waiting for that answer any more); otherwise
   the remaining budget caps the handler's own outbound calls. The header steers this
   server's work, so it is trusted only from an identified mesh caller: from anyone else
   it is ignored, honoured, or raised to a floor (``MESH_UNIDENTIFIED_DEADLINE``);
4. **stages**: plug points, in order, for checks of the application's own; the first
   stage that answers ends the request before the handler;
5. **rate limits** (``_limits``): the caller's bucket, then the process's → 429 with
   ``Retry-After``;
6. **concurrency limit**: a slot among ``MESH_MAX_CONCURRENT_REQUESTS`` or 503 (load
   shed, ``Retry-After: 1``); the slot is the instance's in-flight count, so it is held
   until the response is done (streamed bodies too) and given back by ``finished``;
7. **fault injection** (``_faults``): after the limits, so an injected delay holds its
   slot like a slow handler would; the delay is spent in the middleware (``await`` in
   ASGI, a sleep in the WSGI worker thread) and counts against the caller's deadline.

Everything here is sans-IO: the middlewares translate their protocol to ``InboundRequest``
and a ``LocalResponse`` back, sleep for ``Admitted.fault.delay`` and then ask
``after_delay``.

Headers: a repeated header is one value, its values joined with ``,`` in the order sent
(``joined_headers``), as Envoy's header matchers see it (CVE-2020-25017 was Envoy checking
the first value while the upstream read another) and as gunicorn already hands a WSGI app.
The ASGI middleware gives the app that same joined header, so a rule and the handler can
never read different values of one header.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

from .._logsafe import escaped
from .._runtime import Mesh, live_meshes
from .._status import status_report
from .._version import __version__
from ..instance import Instance
from ..resilience._deadline import DEADLINE_HEADER, Deadline, parse_deadline_header
from ..resilience._retry import OVERLOADED_HEADER  # the client reads it there
from ..routing._propagate import Marks, marks_of
from ..security import Authorizer, SpiffeId, TlsContexts
from ..security._authz import LocalAuthorizer
from ..telemetry import prometheus_text
from ..telemetry._admin import is_loopback, serve_admin, set_routes
from ..telemetry._inbound import peer_service
from ..telemetry._instruments import SERVER_FAULTS, SERVER_LOAD_SHED, SERVER_RATE_LIMITED
from ._faults import FAULT_RESPONSE_HEADER, FaultDecision, FaultInjector
from ._limits import RateLimiter, Refusal

logger = logging.getLogger("meshlib.server")

__all__ = [
    "OVERLOADED_HEADER",
    "RESERVED_PREFIX",
    "Admitted",
    "Inbound",
    "InboundRequest",
    "LocalResponse",
    "Stage",
    "joined_headers",
]

RESERVED_PREFIX = "/mesh/"
#: Set by ``meshlib serve`` to the admin address it reserved: its serving processes share
#: that port (``SO_REUSEPORT``).
ADMIN_REUSE_PORT_ENV = "MESHLIB_ADMIN_REUSE_PORT"
#: A delay cut to the caller's deadline may end up to a timer tick before it: uvloop's
#: timers count whole milliseconds (asyncio's loop pads by its clock resolution), so the
#: deadline counts as passed within this much of it.
_TIMER_SLACK = 0.005
#: Marks a 503 the concurrency limit answered: the request was not handled at all.


class LocalResponse(NamedTuple):
    """A response the mesh gives itself, without the application."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class InboundRequest(NamedTuple):
    """What inbound stages see of a request."""

    method: str
    path: str
    #: Lower-cased header names; a repeated header's values joined (``joined_headers``).
    headers: Mapping[str, str]
    #: The caller's identity from its verified client certificate; None for plaintext.
    peer: SpiffeId | None = None


#: An inbound stage: a LocalResponse ends the request, None lets it through.
Stage = Callable[[InboundRequest], "LocalResponse | None"]


class Admitted(NamedTuple):
    """A request the application may run (after ``fault.delay``, if any)."""

    deadline: Deadline | None
    fault: FaultDecision | None = None
    #: headers to carry onto the handler's mesh calls (routing/_propagate.py)
    marks: Marks = ()


def joined_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased names to values; a repeated header's values joined in order.

    With ``,`` as Envoy joins them for its matchers, and a repeated ``cookie`` with ``; ``
    (RFC 9113, section 8.2.3), so a cookie parser still reads every cookie.
    """
    headers: dict[str, str] = {}
    for name, value in pairs:
        name = name.lower()
        if name in headers:
            headers[name] += ("; " if name == "cookie" else ",") + value
        else:
            headers[name] = value
    return headers


def json_response(
    status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()
) -> LocalResponse:
    """A small JSON answer."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return LocalResponse(
        status,
        (("content-type", "application/json"), ("content-length", str(len(body))), *headers),
        body,
    )


class Inbound:
    """Decides, per request, whether the application runs and with what deadline."""

    def __init__(self, mesh: Mesh, stages: Sequence[Stage] = ()) -> None:
        self.mesh = mesh
        self.instance = mesh.instance
        self.stages = tuple(stages)
        authorizer = mesh.security.authorizer
        #: None when nobody is refused (local lists empty, no intentions): nothing to ask
        self.authorizer: Authorizer | None = (
            None
            if isinstance(authorizer, LocalAuthorizer) and not authorizer.restricts
            else authorizer
        )
        config = mesh.config
        self.service = config.service_name or ""
        self.limiter = RateLimiter(config.rate_limit, config.rate_limit_per_source)
        self.max_concurrent = config.max_concurrent_requests
        self.faults = FaultInjector(config)
        self.unidentified_deadline = config.unidentified_deadline
        self.propagate_headers = config.propagate_headers
        self.propagate_unidentified = config.propagate_unidentified == "honour"

    def open_admin(self) -> str:
        """Serve this server's admin routes (``reserved``) on the process's admin listener,
        opening it if need be; returns its URL."""
        set_routes(self.reserved)
        host, port = self.instance.config.admin_addr or ("127.0.0.1", 0)
        reuse = os.environ.get(ADMIN_REUSE_PORT_ENV) == f"{host}:{port}"
        try:
            return serve_admin(host, port, reuse_port=reuse).url
        except OSError as exc:  # another worker of a server not run by `meshlib serve`
            logger.warning(
                "no admin listener in this process: cannot listen on %s:%d (MESH_ADMIN_ADDR): "
                "%s; the app is served, /mesh/health and /mesh/metrics are not",
                host,
                port,
                exc.strerror,
            )
            return ""

    def not_here(self, path: str) -> LocalResponse:
        """The app port's answer to ``/mesh/...``: those routes live on the admin listener."""
        return json_response(
            404, {"error": f"no route {path} here: mesh routes are on the admin listener"}
        )

    def reserved(self, method: str, path: str, client: str | None = None) -> LocalResponse:
        """Answer an admin request under ``/mesh/`` (``client``: the peer's IP address)."""
        instance = self.instance
        if path in ("/mesh/health", "/mesh/health/ready"):
            config = instance.config
            payload: dict[str, object] = {
                "status": instance.state,
                "service": config.service_name,
                "version": config.service_version,
                "in_flight": instance.in_flight,
                "meshlib": __version__,
            }
            ready = instance.ready
            if path == "/mesh/health/ready":
                # The orchestrator's readiness: serving, *and* listed in discovery, *and*
                # able to prove its identity. /mesh/health (Consul's own check) cannot ask
                # for registration: Consul runs it to decide whether the listing is healthy.
                certificates = _certificates(self.mesh.security.tls)
                payload["registered"] = instance.registered
                payload["certificates"] = certificates
                ready = ready and instance.registered and certificates in ("loaded", "off")
            return json_response(200 if ready else 503, payload)
        if path == "/mesh/health/live":
            return json_response(200, {"status": "alive"})
        if path == "/mesh/metrics":
            return _metrics(instance)
        if path == "/mesh/status":
            if not is_loopback(client):
                return json_response(
                    403, {"error": "/mesh/status lists internal addresses: loopback callers only"}
                )
            report = status_report(live_meshes())
            return json_response(200, {**report, "inbound": self.controls()})
        return json_response(404, {"error": f"no mesh route {path}"})

    def controls(self) -> dict[str, object]:
        """The inbound traffic controls in force (for ``/mesh/status``)."""
        limiter, faults = self.limiter, self.faults.current()
        return {
            "tls": self.instance.config.tls,
            "in_flight": self.instance.in_flight,
            "rate_limit": None if limiter.overall is None else limiter.overall.text,
            "rate_limit_per_source": (
                None if limiter.per_source is None else limiter.per_source.text
            ),
            "max_concurrent_requests": self.max_concurrent,
            "faults": faults.describe() if faults.active else None,
            "faults_from": self.faults.source if faults.active else None,
        }

    def unproven(self, method: str, path: str, reason: str) -> LocalResponse:
        """403 for a caller whose certificate proves no service identity of the mesh.

        Such a caller is not an unidentified (plaintext) one: it is refused in every mode.
        """
        logger.warning(
            "denied %s %s from a certificate without a mesh identity to %s: %s",
            escaped(method),
            escaped(path),
            self.service,
            escaped(reason),
        )
        return json_response(403, {"error": "forbidden", "detail": reason})

    def admit(self, request: InboundRequest) -> LocalResponse | Admitted:
        """A LocalResponse to send instead of running the app, or the request's admission.

        An ``Admitted`` request holds a concurrency slot: the middleware must call
        ``finished`` once its response is done, whatever happens.
        """
        if self.authorizer is not None:
            decision = self.authorizer.decide(
                request.peer, request.method, request.path, dict(request.headers)
            )
            if not decision.allowed:
                logger.warning(
                    "denied %s %s from %s to %s: %s",
                    escaped(request.method),
                    escaped(request.path),
                    request.peer or "an unidentified caller",
                    self.service,
                    escaped(decision.reason),
                )
                return json_response(403, {"error": "forbidden", "detail": decision.reason})
        budget = parse_deadline_header(request.headers.get(DEADLINE_HEADER))
        if budget is not None and request.peer is None:  # not a mesh caller's to set
            floor = self.unidentified_deadline
            budget = None if math.isinf(floor) else max(budget, floor)
        if budget is not None and budget <= 0:
            return _deadline_passed(
                f"the caller's deadline ({DEADLINE_HEADER}: 0) had passed before the "
                "request was handled"
            )
        for stage in self.stages:
            answer = stage(request)
            if answer is not None:
                return answer
        if self.limiter.active:
            refusal = self.limiter.check(request.peer)
            if refusal is not None:
                SERVER_RATE_LIMITED.add((self.service, peer_service(request.peer), refusal.scope))
                return _too_many(refusal)
        if not self.instance.try_request_started(self.max_concurrent):
            SERVER_LOAD_SHED.add((self.service,))
            return json_response(
                503,
                {
                    "error": "overloaded",
                    "detail": f"{self.max_concurrent} requests in flight, the most this "
                    "server takes at once (MESH_MAX_CONCURRENT_REQUESTS); try another "
                    "instance or again shortly",
                },
                # Envoy's x-envoy-overloaded, for meshlib: the handler never ran
                (("retry-after", "1"), (OVERLOADED_HEADER, "true")),
            )
        deadline = None if budget is None else Deadline.after(budget)
        # Steering headers: carried on only from a mesh caller (or as configured)
        marks = marks_of(
            self.propagate_headers,
            request.headers,
            request.peer is not None or self.propagate_unidentified,
        )
        fault = self.faults.decide(request.headers)
        if fault is None:
            return Admitted(deadline, None, marks)
        if fault.delay:
            SERVER_FAULTS.add((self.service, "delay"))
            if deadline is not None:  # nobody waits longer than the caller's deadline
                fault = fault._replace(delay=max(min(fault.delay, deadline.remaining()), 1e-3))
        if fault.abort_status is not None:
            SERVER_FAULTS.add((self.service, "abort"))
            if not fault.delay:
                self.instance.request_finished()
                return _aborted(fault)
        return Admitted(deadline, fault, marks)

    def after_delay(self, admitted: Admitted) -> LocalResponse | None:
        """After an injected delay: the abort or 504 to send instead of running the app."""
        fault = admitted.fault
        if fault is None:
            return None
        if fault.abort_status is not None:
            return _aborted(fault)
        deadline = admitted.deadline
        if deadline is not None and deadline.remaining() <= _TIMER_SLACK:
            return _deadline_passed(
                "the caller's deadline ran out during an injected fault delay",
                ((FAULT_RESPONSE_HEADER, fault.marker),),
            )
        return None

    def finished(self) -> None:
        """An admitted request's response is done: give back its concurrency slot."""
        self.instance.request_finished()


def _deadline_passed(detail: str, headers: tuple[tuple[str, str], ...] = ()) -> LocalResponse:
    return json_response(504, {"error": "deadline exceeded", "detail": detail}, headers)


def _too_many(refusal: Refusal) -> LocalResponse:
    variable = "MESH_RATE_LIMIT_PER_SOURCE" if refusal.scope == "source" else "MESH_RATE_LIMIT"
    whose = "this caller's" if refusal.scope == "source" else "this server's"
    return json_response(
        429,
        {
            "error": "rate limited",
            "detail": f"over {whose} rate limit {refusal.limit.text} ({variable})",
            "retry_after": refusal.retry_after,
        },
        (("retry-after", str(refusal.retry_after)),),
    )


def _aborted(fault: FaultDecision) -> LocalResponse:
    return json_response(
        fault.abort_status or 503,
        {"error": "injected fault", "detail": "aborted by fault injection (MESH_FAULT_*)"},
        ((FAULT_RESPONSE_HEADER, fault.marker),),
    )


def _metrics(instance: Instance) -> LocalResponse:
    # meshlib_ready and meshlib_inbound_requests_in_flight are in the registry (_runtime.py)
    body = prometheus_text().encode()
    return LocalResponse(200, (("content-type", "text/plain; version=0.0.4; charset=utf-8"),), body)


def _certificates(tls: TlsContexts | None) -> str:
    """``off`` (no mesh TLS), ``loaded`` (a leaf valid now) or ``expired``."""
    if tls is None:
        return "off"
    return "loaded" if tls.material.not_after > dt.datetime.now(dt.UTC) else "expired"
