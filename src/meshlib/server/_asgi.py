"""Pure ASGI middleware: the mesh on the way in, for FastAPI, Starlette and any ASGI app.

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``, which runs the app in another
task and so breaks context variables (the inbound deadline and, later, the trace context
live in them). Scope types other than ``http`` and ``lifespan`` pass through untouched.

Lifespan: the app's own startup runs first, then the instance starts (registration);
on shutdown the instance drains first (unready, deregistered, in-flight requests done),
then the app's own shutdown runs, so handlers still have their resources while draining.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from .._config import MeshConfig, load_config
from .._runtime import Mesh
from ..resilience._deadline import inbound_deadline
from ..routing._propagate import inbound_marks
from ..telemetry import asgi as telemetry_around
from ._faults import FAULT_RESPONSE_HEADER
from ._inbound import (
    RESERVED_PREFIX,
    Inbound,
    InboundRequest,
    LocalResponse,
    Stage,
    joined_headers,
)

__all__ = ["ASGIMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ASGIMiddleware:
    """Join the mesh on the server side of an ASGI app.

    ``app.add_middleware(meshlib.ASGIMiddleware)`` for FastAPI/Starlette, or
    ``meshlib.ASGIMiddleware(app)`` for any ASGI app. Serves ``/mesh/health``,
    ``/mesh/metrics`` and ``/mesh/status`` on the admin listener (``MESH_ADMIN_ADDR``; the
    app's port answers ``/mesh/...`` with 404), refuses requests whose caller's deadline has
    passed (504), caps the handler's outbound calls by the caller's deadline, applies the
    configured rate limits (429), concurrency limit (503) and fault injection
    (``MESH_RATE_LIMIT*``, ``MESH_MAX_CONCURRENT_REQUESTS``, ``MESH_FAULT_*``), and
    registers the instance in Consul on startup and deregisters it (after draining) on
    shutdown.


    Keys it adds to the scope: ``meshlib.deadline`` (a ``Deadline`` or ``None``).

    Args:
        app: the application.
        config: configuration to use instead of reading the environment.
        stages: inbound stages to run before the application, in order.
        mesh: the mesh to join (default: the process's mesh for ``config``, shared with
            its clients and other middlewares; one made with ``meshlib.Mesh`` and closed
            by its maker keeps a test or an embedded server to itself).

    Raises:
        meshlib.ConfigError: the environment holds a bad ``MESH_*``/``CONSUL_*`` value, or
            the config file a bad ``faults`` entry.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: MeshConfig | None = None,
        stages: tuple[Stage, ...] = (),
        mesh: Mesh | None = None,
    ) -> None:
        self.app = app
        self.mesh = mesh or Mesh.for_config(load_config() if config is None else config)
        self.config = self.mesh.config
        self.inbound = Inbound(self.mesh, stages)
        self.instance = self.inbound.instance
        #: the HTTP path inside the SERVER span, server metrics and access log
        self._traced_http = telemetry_around(self._http, self.config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._traced_http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        instance = self.instance
        if instance.state == "starting":  # a server that does not run lifespan
            server = scope.get("server") or (None, None)
            await anyio.to_thread.run_sync(lambda: self._start(server[0], server[1]))
        path: str = scope["path"]
        if path.startswith(RESERVED_PREFIX):  # served on the admin listener only
            await _send_local(send, self.inbound.not_here(path))
            return
        raw = scope["headers"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
        if len(headers) != len(raw):  # a header was repeated: the app sees what rules saw
            headers = joined_headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw)
            scope["headers"] = [
                (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
            ]
        # Set by the server's TLS layer (meshlib serve) from the verified certificate;
        # a scope from anywhere else has no peer.
        peer = scope.get("meshlib.peer")
        inbound = self.inbound
        verdict = inbound.admit(InboundRequest(scope["method"], path, headers, peer))
        if isinstance(verdict, LocalResponse):
            await _send_local(send, verdict)
            return
        # admitted: it holds a concurrency slot until `finished`, whatever happens below
        scope["meshlib.deadline"] = verdict.deadline
        token = inbound_deadline.set(verdict.deadline)
        marks_token = inbound_marks.set(verdict.marks)
        try:
            fault = verdict.fault
            if fault is not None:
                if fault.delay:
                    await sleep_at_least(fault.delay)  # never block the event loop
                answer = inbound.after_delay(verdict)
                if answer is not None:
                    await _send_local(send, answer)
                    return
                send = _marked(send, fault.marker)
            await self.app(scope, receive, send)
        finally:
            inbound.finished()
            inbound_deadline.reset(token)
            inbound_marks.reset(marks_token)

    def _start(self, address: str | None = None, port: int | None = None) -> None:
        """Open the admin listener, then start (and register) the instance."""
        self.inbound.open_admin()
        self.instance.start(address=address, port=port)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        instance = self.instance
        received_any = False

        async def mesh_receive() -> Message:
            nonlocal received_any
            received_any = True
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await anyio.to_thread.run_sync(instance.stop)
            return message

        async def mesh_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await anyio.to_thread.run_sync(self._start)
            await send(message)

        try:
            await self.app(scope, mesh_receive, mesh_send)
        except Exception:
            if received_any:
                raise  # the app's own startup or shutdown failed
            await self._own_lifespan(receive, send)  # the app does not speak lifespan

    async def _own_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await anyio.to_thread.run_sync(self._start)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await anyio.to_thread.run_sync(self.instance.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return


async def sleep_at_least(seconds: float) -> None:
    """Sleep ``seconds`` by the monotonic clock, not less: an injected delay is at least
    what was configured, as ``time.sleep`` gives the WSGI middleware.

    uvloop's timers count whole milliseconds from a clock read at the start of the loop's
    turn, so ``sleep(0.3)`` ended up to a millisecond early (CI: a 300 ms fault delay took
    299.92 ms of the caller's deadline); the rest is slept again.
    """
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        await anyio.sleep(left)


async def _send_local(send: Send, response: LocalResponse) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": [(k.encode(), v.encode()) for k, v in response.headers],
        }
    )
    await send({"type": "http.response.body", "body": response.body})


def _marked(send: Send, marker: str) -> Send:
    """``send`` adding ``x-mesh-fault`` to the response start (an injected delay)."""
    header = (FAULT_RESPONSE_HEADER.encode(), marker.encode())

    async def marked_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return marked_send
