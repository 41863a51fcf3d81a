"""Client / AsyncClient: real httpx clients whose transport is the mesh.

``MeshTransport`` wraps an inner transport that does the I/O (by default one pooled
``httpx.HTTPTransport`` for every endpoint; async, ``AsyncPoolTransport``, httpcore's
connections under a free-list pool, because httpcore's own async pool caps throughput:
see _async_pool.py). Hosts that are not mesh services pass straight through to it
(after the egress policy), measured like any other request (``_bypass``: a CLIENT span,
the duration metric, an access log line). For mesh services, the transport is a loop
around a sans-IO ``Call`` (_pipeline.py), which holds every policy decision, so the sync
and async transports below differ only in ``await``.

A request that may be hedged (``MESH_HEDGE_DELAY`` or the ``hedge`` option) takes a second
loop, ``_hedged``, because its attempts may overlap: async, each attempt is a task in a
task group and the loser is cancelled (httpcore then closes its connection at once);
sync, each attempt runs on a worker thread and the loser is abandoned (see ``_Race`` for
why it cannot be interrupted). Requests that are not hedged never start a thread or a
task.
"""

from __future__ import annotations

import logging
import os
import queue
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import anyio
import httpx
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._async_pool import AsyncPoolTransport
from ._config import MeshConfig, load_config
from ._core import CorePoolTransport
from ._exceptions import MeshRequestError, UntrustedCertificate
from ._pipeline import MAX_HEDGES, WAIT, Admission, Attempt, Call, clone_request
from ._runtime import Mesh
from .security._refusals import TLS_REQUIRED_HEADER, tls_required_message
from .security._verify import identity_check
from .telemetry import OutboundTelemetry

__all__ = ["AsyncClient", "AsyncMeshTransport", "Client", "MeshTransport"]

logger = logging.getLogger("meshlib.client")


def _runtime(config: MeshConfig | None, mesh: Mesh | None) -> Mesh:
    if mesh is not None:
        return mesh
    return Mesh.for_config(load_config() if config is None else config)


class MeshTransport(httpx.BaseTransport):
    """The mesh as an httpx transport.

    Args:
        inner: the transport that does the I/O (default: a pooled ``httpx.HTTPTransport``).
            Transport options such as ``limits`` or ``http2`` belong on it.
        config: configuration to use instead of reading the environment.
        mesh: an existing runtime to share (default: the process's runtime for ``config``).

    """

    def __init__(
        self,
        inner: httpx.BaseTransport | None = None,
        *,
        config: MeshConfig | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        self.mesh = _runtime(config, mesh)
        self._inner = _Plaintext(httpx.HTTPTransport() if inner is None else inner)
        self._tls = _TlsPools(self.mesh, _trust_checked(self.mesh, _Trust))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``: through the mesh for a mesh service, else straight through."""
        admission = Admission(self.mesh, request)
        try:
            while (wait := admission.next()) is not None:
                if wait.service:
                    self.mesh.discovery.wait(wait.service, wait.seconds)
                else:
                    time.sleep(wait.seconds)
        finally:
            admission.close()
        call = admission.call
        if call is None:
            return self._bypass(request)
        if call.hedge_delay:
            return self._hedged(call, request)
        read_body = _reads_body(request, call)
        response: httpx.Response | None = None
        try:
            while True:
                attempt = call.start_attempt(request)
                inner: httpx.BaseTransport = self._inner
                if attempt.tls:
                    inner = self._pool(request, call.service.name)
                try:
                    response = inner.handle_request(request)
                    if read_body:
                        _read_within_attempt(response)
                except httpx.TransportError as exc:
                    response = None
                    delay = call.attempt_failed(attempt, exc)
                    if delay is None:
                        raise
                else:
                    delay = call.attempt_responded(attempt, response)
                    if delay is None:
                        return response
                    response.close()
                    response = None
                time.sleep(delay)
        finally:
            call.finish(request, response)

    def _bypass(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to a host that is no mesh service, with telemetry around it.

        The egress policy first, then straight to the inner transport.
        """
        telemetry = OutboundTelemetry.external(request, self.mesh.config.service_name or "")
        response: httpx.Response | None = None
        try:
            self.mesh.security.egress.check(request.url.host)
            try:
                response = self._inner.handle_request(request)
            except httpx.ConnectError as exc:
                error = self.mesh.unknown_service(request.url.host, exc)
                if error is exc:
                    raise
                raise error from exc
            return response
        finally:
            telemetry.finish(None, response, None if response is not None else sys.exc_info()[1])

    def _pool(self, request: httpx.Request, service: str) -> httpx.BaseTransport:
        pool = self._tls.prepare(request, service)
        for old in self._tls.expired():
            old.close()
        return pool

    def _hedged(self, call: Call, request: httpx.Request) -> httpx.Response:
        """The loop of a request that may be hedged: attempts on worker threads."""
        race = _Race()
        response: httpx.Response | None = None
        try:
            while True:
                copy = clone_request(request)
                race.send(self._inner_for(call.start_attempt(copy), copy, call), copy)
                hedge_at = time.monotonic() + call.hedge_delay if call.may_hedge() else None
                while True:
                    now = time.monotonic()
                    wait = call.deadline.remaining(now)
                    if hedge_at is not None:
                        wait = min(wait, hedge_at - now)
                    item = race.next(wait)
                    if item is None:  # time to hedge, or the deadline passed
                        now = time.monotonic()
                        if call.deadline.remaining(now) <= 0:
                            raise call.deadline_passed(request)
                        if hedge_at is not None and now >= hedge_at:
                            hedge_at = None
                            copy = clone_request(request)
                            hedge = call.start_hedge(copy) if _WORKERS.may_abandon() else None
                            if hedge is not None:
                                race.send(self._inner_for(hedge, copy, call), copy)
                        continue
                    attempt, result = item
                    if isinstance(result, httpx.Response):
                        delay = call.attempt_responded(attempt, result)
                        if delay is None:
                            response = result
                            return result
                        result.close()
                    elif isinstance(result, httpx.TransportError):
                        delay = call.attempt_failed(attempt, result)
                        if delay is None:
                            raise result
                    else:
                        raise result
                    if delay != WAIT:
                        break
                time.sleep(delay)
        finally:
            race.abandon()
            call.finish(request, response)

    def _inner_for(
        self, attempt: Attempt, request: httpx.Request, call: Call
    ) -> tuple[Attempt, httpx.BaseTransport]:
        inner = self._pool(request, call.service.name) if attempt.tls else self._inner
        return attempt, inner

    def close(self) -> None:
        """Close the inner transport (the shared runtime stays up for other clients)."""
        self._inner.close()
        for pool in self._tls.drain():
            pool.close()


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """The async twin of :class:`MeshTransport`; same arguments.

    The default inner transport is not ``httpx.AsyncHTTPTransport`` but meshlib's own pool
    over httpcore's connections (about 3x the throughput with many requests in flight);
    pass ``inner=httpx.AsyncHTTPTransport(...)`` to use httpx's.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        config: MeshConfig | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        self.mesh = _runtime(config, mesh)
        self._inner = _AsyncPlaintext(AsyncPoolTransport() if inner is None else inner)
        self._tls = _TlsPools(self.mesh, _trust_checked(self.mesh, _AsyncTrust))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``: through the mesh for a mesh service, else straight through."""
        admission = Admission(self.mesh, request)
        try:
            while (wait := admission.next()) is not None:
                if wait.service:
                    await anyio.to_thread.run_sync(
                        self.mesh.discovery.wait, wait.service, wait.seconds
                    )
                else:
                    await anyio.sleep(wait.seconds)
        finally:
            admission.close()
        call = admission.call
        if call is None:
            return await self._bypass(request)
        if call.hedge_delay:
            return await self._hedged(call, request)
        read_body = _reads_body(request, call)
        response: httpx.Response | None = None
        try:
            while True:
                attempt = call.start_attempt(request)
                inner: httpx.AsyncBaseTransport = self._inner
                if attempt.tls:
                    inner = await self._pool(request, call.service.name)
                try:
                    response = await inner.handle_async_request(request)
                    if read_body:
                        await _aread_within_attempt(response)
                except httpx.TransportError as exc:
                    response = None
                    delay = call.attempt_failed(attempt, exc)
                    if delay is None:
                        raise
                else:
                    delay = call.attempt_responded(attempt, response)
                    if delay is None:
                        return response
                    await response.aclose()
                    response = None
                await anyio.sleep(delay)
        finally:
            call.finish(request, response)

    async def _bypass(self, request: httpx.Request) -> httpx.Response:
        """The async twin of ``MeshTransport._bypass``."""
        telemetry = OutboundTelemetry.external(request, self.mesh.config.service_name or "")
        response: httpx.Response | None = None
        try:
            self.mesh.security.egress.check(request.url.host)
            try:
                response = await self._inner.handle_async_request(request)
            except httpx.ConnectError as exc:
                error = self.mesh.unknown_service(request.url.host, exc)
                if error is exc:
                    raise
                raise error from exc
            return response
        finally:
            telemetry.finish(None, response, None if response is not None else sys.exc_info()[1])

    async def _pool(self, request: httpx.Request, service: str) -> httpx.AsyncBaseTransport:
        pool = self._tls.prepare(request, service)
        for old in self._tls.expired():
            await old.aclose()
        return pool

    async def _hedged(self, call: Call, request: httpx.Request) -> httpx.Response:
        """The loop of a request that may be hedged: each attempt is a task.

        The losers are cancelled with the task group, and closed before this returns.
        """
        send, receive = anyio.create_memory_object_stream[_Result](MAX_HEDGES + 1)
        response: httpx.Response | None = None
        error: Exception | None = None
        try:
            async with anyio.create_task_group() as tasks:
                try:
                    response = await self._race(call, request, tasks, send, receive)
                except Exception as exc:  # raised below, once the losers are cancelled
                    error = exc
                tasks.cancel_scope.cancel()
            if error is not None:
                raise error
            assert response is not None
            return response
        finally:
            send.close()
            while True:  # answers that came in after the race was decided
                try:
                    _, result = receive.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
                if isinstance(result, httpx.Response):
                    with anyio.CancelScope(shield=True):
                        await result.aclose()
            receive.close()
            call.finish(request, response)

    async def _race(
        self,
        call: Call,
        request: httpx.Request,
        tasks: TaskGroup,
        send: MemoryObjectSendStream[_Result],
        receive: MemoryObjectReceiveStream[_Result],
    ) -> httpx.Response:
        while True:
            copy = clone_request(request)
            await self._launch(tasks, send, call.start_attempt(copy), copy, call)
            hedge_at = time.monotonic() + call.hedge_delay if call.may_hedge() else None
            while True:
                now = time.monotonic()
                wait = call.deadline.remaining(now)
                if hedge_at is not None:
                    wait = min(wait, hedge_at - now)
                item: _Result | None = None
                with anyio.move_on_after(max(wait, 0.0)):
                    item = await receive.receive()
                if item is None:  # time to hedge, or the deadline passed
                    now = time.monotonic()
                    if call.deadline.remaining(now) <= 0:
                        raise call.deadline_passed(request)
                    if hedge_at is not None and now >= hedge_at:
                        hedge_at = None
                        copy = clone_request(request)
                        hedge = call.start_hedge(copy)
                        if hedge is not None:
                            await self._launch(tasks, send, hedge, copy, call)
                    continue
                attempt, result = item
                if isinstance(result, httpx.Response):
                    delay = call.attempt_responded(attempt, result)
                    if delay is None:
                        return result
                    await result.aclose()
                elif isinstance(result, httpx.TransportError):
                    delay = call.attempt_failed(attempt, result)
                    if delay is None:
                        raise result
                else:
                    raise result
                if delay != WAIT:
                    break
            await anyio.sleep(delay)

    async def _launch(
        self,
        tasks: TaskGroup,
        send: MemoryObjectSendStream[_Result],
        attempt: Attempt,
        request: httpx.Request,
        call: Call,
    ) -> None:
        inner: httpx.AsyncBaseTransport = self._inner
        handshake: _Handshake | None = None
        if attempt.tls:
            inner = await self._pool(request, call.service.name)
            handshake = _Handshake(request)

        async def run() -> None:
            result: httpx.Response | Exception
            try:
                result = await inner.handle_async_request(request)
            except Exception as exc:  # delivered to the race, which decides
                result = exc
            except BaseException:  # cancelled: it lost the race
                if handshake is not None:
                    await handshake.abandon()
                raise
            send.send_nowait((attempt, result))

        tasks.start_soon(run)

    async def aclose(self) -> None:
        """Close the inner transport (the shared runtime stays up for other clients)."""
        await self._inner.aclose()
        for pool in self._tls.drain():
            await pool.aclose()


_Result = tuple[Attempt, "httpx.Response | Exception"]


class _Handshake:
    """The TCP stream of an async attempt's new connection while its TLS handshake runs.

    Why: httpcore (1.0.9) closes that stream when the handshake fails, but not when the
    task is cancelled during it (``AnyIOStream.start_tls`` catches ``Exception``, and
    cancellation is a ``BaseException``), so the socket stays open until the garbage
    collector finds it. A hedge race's loser is cancelled exactly there whenever its
    endpoint is slow to handshake, so the loser closes the stream itself. httpcore's
    ``trace`` extension is the public way to see the stream.
    """

    __slots__ = ("_inner", "stream")

    def __init__(self, request: httpx.Request) -> None:
        self.stream: Any = None
        self._inner = request.extensions.get("trace")
        request.extensions["trace"] = self

    async def __call__(self, name: str, info: dict[str, Any]) -> None:
        if name == "connection.connect_tcp.complete":
            self.stream = info.get("return_value")
        elif name == "connection.start_tls.complete" or (
            # a failed handshake is closed by httpcore; a cancelled one is not
            name == "connection.start_tls.failed" and isinstance(info.get("exception"), Exception)
        ):
            self.stream = None
        if self._inner is not None:
            await self._inner(name, info)

    async def abandon(self) -> None:
        """Close the stream if the attempt was cancelled during its handshake."""
        stream, self.stream = self.stream, None
        if stream is not None:
            with anyio.CancelScope(shield=True):
                await stream.aclose()


#: Sync losers still blocked on their endpoint, process-wide, beyond which no new hedge
#: starts: each holds a thread and a pooled connection until its endpoint answers or its
#: attempt timeout fires, and httpx's default pool has 100 connections.
_MAX_ABANDONED: Final = 32


class _Race:
    """The attempts of one hedged sync request, each on a worker thread.

    Threads, because a sync transport blocks until the response headers arrive, and the
    caller must be able to take a hedge's answer while the first attempt is still blocked.
    The Call stays single-threaded: workers only do the I/O and post what they got; the
    caller's thread feeds it to the Call. httpx's pooled transport is safe to share across
    threads (httpcore guards its pool with a lock), and the two attempts go to different
    endpoints, so to different connections.

    The loser is abandoned, not interrupted: httpcore's sync I/O has no cancellation, and
    the only way httpx's public API offers to break a blocked read from another thread is
    closing the whole pool. So its worker stays blocked until the slow endpoint answers or
    the attempt timeout (``MESH_TIMEOUT``, capped by the deadline) fires, then closes what
    it got without reading the body, which closes the connection rather than returning
    a half-read one to the pool. The caller is not kept waiting, and nothing leaks; the
    cost is a thread and a connection for that while, bounded process-wide by
    ``_MAX_ABANDONED``. (Async clients cancel the loser's task instead, and httpcore
    closes its connection at once.)
    """

    __slots__ = ("_abandoned", "_lock", "_results", "_running")

    def __init__(self) -> None:
        self._results: queue.SimpleQueue[_Result] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = 0
        self._abandoned = False

    def send(self, target: tuple[Attempt, httpx.BaseTransport], request: httpx.Request) -> None:
        """Send ``request`` for ``attempt`` on ``inner`` on a worker thread."""
        attempt, inner = target
        with self._lock:
            self._running += 1
        _WORKERS.submit(lambda: self._run(attempt, inner, request))

    def _run(self, attempt: Attempt, inner: httpx.BaseTransport, request: httpx.Request) -> None:
        result: httpx.Response | Exception
        try:
            result = inner.handle_request(request)
        except Exception as exc:  # posted to the caller's thread, which decides
            result = exc
        with self._lock:
            self._running -= 1
            abandoned = self._abandoned
            if not abandoned:
                self._results.put((attempt, result))
        if abandoned:
            if isinstance(result, httpx.Response):
                result.close()
            _WORKERS.loser_done()

    def next(self, timeout: float) -> _Result | None:
        """The next attempt's result, or None after ``timeout`` seconds."""
        try:
            return self._results.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def abandon(self) -> None:
        """The race is over: close answers nobody took; workers still blocked close theirs."""
        with self._lock:
            self._abandoned = True
            _WORKERS.losers_abandoned(self._running)
        while True:
            try:
                _, result = self._results.get_nowait()
            except queue.Empty:
                return
            if isinstance(result, httpx.Response):
                result.close()


class _Workers:
    """Daemon threads for hedged sync attempts: an idle one is reused, else one starts.

    Not ``ThreadPoolExecutor``: with a fixed size, a hedge would queue behind abandoned
    losers (each blocked up to the attempt timeout), and its threads are joined at
    interpreter exit. Starting a thread costs ~100 µs here, handing a job to an idle
    one ~30 µs; a thread idle for a minute exits.
    """

    _IDLE_EXIT = 60.0

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        #: abandoned losers still blocked
        self.abandoned = 0

    def reset(self) -> None:
        """Forget every thread: after a fork, none of them exists in the child."""
        self.__init__()  # type: ignore[misc]

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # promised to one of the idle threads
        self._jobs.put(job)
        if spawn:
            threading.Thread(target=self._work, name="meshlib-hedge", daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # no job was promised to an idle thread: leave
                        self._idle -= 1
                        return
                continue  # every idle thread has a job on its way: take one
            try:
                job()
            except Exception:  # the jobs catch their own errors; this is a last resort
                logger.exception("hedged attempt failed")
            with self._lock:
                self._idle += 1

    def losers_abandoned(self, count: int) -> None:
        if count:
            with self._lock:
                self.abandoned += count

    def loser_done(self) -> None:
        with self._lock:
            self.abandoned -= 1

    def may_abandon(self) -> bool:
        """Whether another loser may be left behind (few enough are still blocked)."""
        return self.abandoned < _MAX_ABANDONED


_WORKERS = _Workers()
# A child forked by a pre-forking server (gunicorn --preload) must not count on idle
# threads of its parent: it would hand hedged attempts to threads that are not there.
os.register_at_fork(after_in_child=_WORKERS.reset)

Pool = TypeVar("Pool", bound="_Trust | _AsyncTrust")


class _TlsPools(Generic[Pool]):
    """Mesh-TLS connection pools, one per destination service and trust generation.

    Per service, because the server's identity is checked when a connection is made
    (security/_verify.py) and a pooled connection is reused without that check: a
    connection verified for ``weather`` must only ever carry requests for ``weather``.
    Per generation of the TLS material, because a renewed leaf or a changed trust bundle
    comes as a new SSL context (security/_contexts.py); the previous generation's pools stay
    open for requests in flight and are closed two generations later (hours, with leaves
    renewed after two thirds of their lifetime).
    """

    def __init__(self, mesh: Mesh, factory: Callable[..., Pool]) -> None:
        self._security = mesh.security
        self._factory: Callable[..., Pool] = factory
        self._pools: dict[tuple[str, int], Pool] = {}
        self._retired: list[tuple[int, Pool]] = []  # (generation that retired it, pool)
        self._lock = threading.Lock()

    def prepare(self, request: httpx.Request, service: str) -> Pool:
        """Set SNI on ``request``; the pool to send it on.

        The pool checks each new connection's server identity after its handshake
        (security/_verify.py).
        """
        tls = self._security.tls
        assert tls is not None
        key = (service, tls.generation)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._new_pool(key, tls.client)
        request.extensions["sni_hostname"] = service
        return pool

    def _new_pool(self, key: tuple[str, int], context: ssl.SSLContext) -> Pool:
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                check = identity_check(self._security.expected(key[0]))
                pool = self._factory(verify=context, handshake=check)
                self._pools[key] = pool
                stale = [k for k in self._pools if k[0] == key[0] and k[1] < key[1] - 1]
                self._retired.extend((key[1], self._pools.pop(k)) for k in stale)
            return pool

    def expired(self) -> list[Pool]:
        """Retired pools two generations old (to close): nothing should still run on them."""
        if not self._retired:
            return []
        tls = self._security.tls
        generation = tls.generation if tls is not None else 0
        with self._lock:
            old = [pool for retired_at, pool in self._retired if retired_at < generation - 1]
            self._retired = [(g, p) for g, p in self._retired if g >= generation - 1]
        return old

    def drain(self) -> list[Pool]:
        """Every pool, forgotten (to close)."""
        with self._lock:
            pools = [*self._pools.values(), *(pool for _, pool in self._retired)]
            self._pools.clear()
            self._retired.clear()
        return pools


#: Set by ``Client.send`` / ``AsyncClient.send`` on a request whose caller reads the whole
#: body anyway (``stream=False``, httpx's default).
READ_BODY = "meshlib.read_body"


def _reads_body(request: httpx.Request, call: Call) -> bool:
    """Whether to read the body inside the attempt (a mid-body loss is then retried).

    A connection lost mid-body is then an attempt failure, retried on another instance,
    not an error for the caller. Only for a caller that reads the whole body right after
    anyway (so nothing is held longer or buffered that would not be) and a request that may
    be sent again (the same rule as any retry after bytes reached the server). A streaming
    caller gets the body as it arrives, as before: once it has seen a byte, nothing can be
    replayed.
    """
    return bool(request.extensions.get(READ_BODY)) and call.may_resend and call.replayable


def _read_within_attempt(response: httpx.Response) -> None:
    try:
        response.read()
    except httpx.TransportError:
        response.close()
        raise


async def _aread_within_attempt(response: httpx.Response) -> None:
    try:
        await response.aread()
    except httpx.TransportError:
        await response.aclose()
        raise


class _Cookies(httpx.Cookies):
    """httpx's cookie jar, where a response without ``Set-Cookie`` costs nothing.

    httpx hands every response to ``extract_cookies``, which builds urllib's request and
    response stand-ins for ``http.cookiejar`` before that finds no ``Set-Cookie`` header:
    5.9% of the async client's CPU at 32 in flight (py-spy, docs/performance.md, row 2), for
    service calls that rarely set cookies. Responses that do are handled by httpx as before.
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        """Store the response's cookies (``http.cookiejar`` reads only these two headers)."""
        headers = response.headers
        if "set-cookie" in headers or "set-cookie2" in headers:
            super().extract_cookies(response)


def _cookies_property() -> Any:
    """``httpx`` clients' ``cookies`` property, keeping the jar a ``_Cookies``."""

    def get(client: httpx.Client | httpx.AsyncClient) -> httpx.Cookies:
        return client._cookies

    def put(client: httpx.Client | httpx.AsyncClient, cookies: httpx._types.CookieTypes) -> None:
        client._cookies = _Cookies(cookies)

    return property(get, put, doc="Cookie values to include when sending requests.")


class Client(httpx.Client):
    """An ``httpx.Client`` that sends requests for mesh services through the mesh.

    ``http://weather/v1/forecast`` goes to a healthy instance of the service ``weather``;
    other URLs behave as with a plain ``httpx.Client``. Every ``httpx.Client`` argument
    works; ``transport`` becomes the mesh's inner transport. ``timeout`` is unset by default
    so the mesh's per-attempt timeout and deadline (``MESH_TIMEOUT``, ``MESH_DEADLINE``)
    apply; a ``timeout`` given here caps each attempt further.

    Per-request options go in ``extensions={"meshlib": {...}}``: ``retry_non_idempotent``
    (resend a POST/PATCH after it may have reached the server), ``deadline`` (seconds),
    ``retries`` and ``hedge`` (seconds before a hedged attempt, or ``False``; see
    ``MESH_HEDGE_DELAY``). What the mesh did is in ``response.extensions["meshlib"]``.

    Args:
        transport: the inner transport that does the I/O (default: a pooled one).
        timeout: a cap on each attempt (default: none beyond the mesh's own).
        config: configuration to use instead of reading the environment.
        mesh: the mesh to call through (default: the process's mesh for ``config``, shared
            by every client and middleware built from it); see :class:`meshlib.Mesh`.
        **kwargs: any other ``httpx.Client`` argument.

    Raises:
        meshlib.ConfigError: the environment holds a bad ``MESH_*``/``CONSUL_*`` value.

    """

    def __init__(
        self,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float | httpx.Timeout | None = None,
        config: MeshConfig | None = None,
        mesh: Mesh | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            transport=MeshTransport(transport, config=config, mesh=mesh), timeout=timeout, **kwargs
        )
        self.cookies = self._cookies

    cookies = _cookies_property()

    def send(
        self, request: httpx.Request, *, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """``httpx.Client.send``; a non-streaming request's body is read in its attempt."""
        if not stream:
            request.extensions[READ_BODY] = True
        return super().send(request, stream=stream, **kwargs)


class AsyncClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that sends requests for mesh services through the mesh.

    The async twin of :class:`Client`, with the same arguments and behaviour.
    """

    def __init__(
        self,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float | httpx.Timeout | None = None,
        config: MeshConfig | None = None,
        mesh: Mesh | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            transport=AsyncMeshTransport(transport, config=config, mesh=mesh),
            timeout=timeout,
            **kwargs,
        )
        self.cookies = self._cookies

    cookies = _cookies_property()

    async def send(
        self, request: httpx.Request, *, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """``httpx.AsyncClient.send``; a non-streaming request's body is read in its attempt."""
        if not stream:
            request.extensions[READ_BODY] = True
        return await super().send(request, stream=stream, **kwargs)


def _tls_required(request: httpx.Request) -> MeshRequestError:
    service = request.headers.get("host", request.url.host)
    return MeshRequestError(
        tls_required_message(service, request.url.netloc.decode()),
        service=service,
        request=request,
    )


class _Plaintext(httpx.BaseTransport):
    """The plaintext inner transport, telling of a strict server's refusal.

    The refusal becomes an error that says what to do (``security/_refusals.py``), not a
    400 or a bare disconnect.
    """

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if response.status_code == 400 and TLS_REQUIRED_HEADER in response.headers:
            response.close()
            raise _tls_required(request)
        return response

    def close(self) -> None:
        self.inner.close()


class _AsyncPlaintext(httpx.AsyncBaseTransport):
    """The async twin of ``_Plaintext``."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if response.status_code == 400 and TLS_REQUIRED_HEADER in response.headers:
            await response.aclose()
            raise _tls_required(request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def _trust_source(config: MeshConfig) -> str:
    if config.tls_ca == "consul":
        return "Consul's Connect CA (MESH_TLS_CA=consul)"
    return f"the local CA in MESH_TLS_DIR={config.tls_dir}"


def _untrusted(exc: httpx.ConnectError, request: httpx.Request, source: str) -> Exception:
    """``exc`` as ``UntrustedCertificate`` when a CA mismatch failed the handshake."""
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None or isinstance(cause, ssl.SSLError):
            break
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, ssl.SSLError):
        return exc
    service = request.headers.get("host", request.url.host)
    where = request.url.netloc.decode()
    if isinstance(cause, ssl.SSLCertVerificationError):
        message = (
            f"the certificate of {where} (service {service!r}) is not from the mesh's CA this "
            f"process trusts, {source}: {cause.verify_message}; run both sides from one CA"
        )
    elif cause.reason in {"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"}:
        message = (
            f"{where} (service {service!r}) refused this process's certificate "
            f"({cause.reason}): it trusts another CA than {source}; run both sides from one CA"
        )
    else:
        return exc
    error = UntrustedCertificate(message, service=service, request=request)
    error.__cause__ = exc
    return error


def _trust_checked(mesh: Mesh, wrapper: Callable[[Any, str], Pool]) -> Callable[..., Pool]:
    source = _trust_source(mesh.config)
    return lambda **options: wrapper(options, source)


class _Trust(httpx.BaseTransport):
    """A mesh-TLS pool whose handshake failures on trust say which CA to fix."""

    def __init__(self, options: dict[str, Any], source: str) -> None:
        self.inner = CorePoolTransport(**options)
        self._source = source

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return self.inner.handle_request(request)
        except httpx.ConnectError as exc:
            raise _untrusted(exc, request, self._source)  # noqa: B904 - its cause is set

    def close(self) -> None:
        self.inner.close()


class _AsyncTrust(httpx.AsyncBaseTransport):
    """The async twin of ``_Trust``."""

    def __init__(self, options: dict[str, Any], source: str) -> None:
        self.inner = AsyncPoolTransport(**options)
        self._source = source

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self.inner.handle_async_request(request)
        except httpx.ConnectError as exc:
            raise _untrusted(exc, request, self._source)  # noqa: B904 - its cause is set

    async def aclose(self) -> None:
        await self.inner.aclose()
