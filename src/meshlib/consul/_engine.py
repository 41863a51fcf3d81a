"""The watcher engine: every blocking query of a process on one thread, one event loop.

A thread per watch (what py-consul's sync client would need, since each blocking query
holds its caller for up to ``wait`` seconds) costs a thread per watched thing; py-consul's
async client runs on aiohttp, a second HTTP stack next to the httpx meshlib is built on. So
the engine runs plain ``httpx.AsyncClient``s on one daemon thread.

What is watched is kept small by design (discovery watches the whole datacenter with one
query, see ``discovery/_consul.py``): a handful of blocking queries, each on a
one-connection client of its own (a blocking query holds its connection for up to
``wait``; httpcore's pool is not built for many requests that all stay in flight), and one
more connection for short, non-blocking reads (``fetch``).

Blocking-query etiquette, as Consul's documentation asks of every client
(https://developer.hashicorp.com/consul/api-docs/features/blocking):

* send the last ``X-Consul-Index`` with a ``wait``; leave the HTTP timeout above ``wait``
  plus the up to ``wait / 16`` jitter Consul adds;
* if the index goes backwards (a restarted dev agent, a restored snapshot), reset it to 0,
  so the next query answers at once instead of blocking on an index that will not come;
* never block on an index of 0 or less: use 1;
* rate-limit each loop (``min_interval``): a flapping value must not turn the watch into a
  busy loop against the servers;
* on errors back off with full jitter (up to ``max_backoff``) and keep the last good state.
  After an error the next query starts from index 0: the agent may have restarted with a
  lower index, and a stale one would hide changes for up to ``wait``.

No blind spot: a restart seen by one watch (its index went backwards, or its outage ended)
is news for all of them. Another watch may already be blocked on the new agent with an
index from the old one, and would stay blind for up to ``wait``; so every blocking query in
flight is dropped and re-sent from index 0, and ``on_reset`` listeners hear of it. And a
blocking query never opens a connection with a full ``wait``: an agent can restart between
two queries of a watch (it even answers queries in flight while shutting down), so when the
connection is gone the watch first asks without blocking, then blocks at most a second on
the new connection; a restarted agent's lower index is seen within that second.

A control plane that blinks is logged once when the outage starts and once when it ends,
never per retry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import threading
from collections.abc import Callable, Coroutine, Mapping
from contextlib import suppress
from typing import Any, ClassVar

# Imported now, not lazily by the watch thread's first request: a pre-forking server
# (gunicorn) forks while that thread may be importing, and the child inherits the module
# lock held, so its own watch thread hangs on the import forever (seen: a worker never read
# its faults from Consul KV). These are what a first async request imports.
import anyio._backends._asyncio
import anyio.to_thread  # noqa: F401
import httpx

from .._acl import FILTERED_HEADER, Refused, refusal
from .._config import ConsulSettings
from ._http import client_options, request_extensions

__all__ = ["BadAnswer", "Engine", "reason"]

logger = logging.getLogger("meshlib.consul")


class BadAnswer(Exception):
    """Consul answered, but not with something a watch can use."""


class Engine:
    """One thread and event loop running blocking queries against one Consul agent.

    ``wait`` is how long Consul may hold one blocking query; ``min_interval`` is the
    shortest time between two queries of one watch; ``max_backoff`` caps the pause after
    an error. The last two exist mostly so tests can make them short. ``log`` is the
    logger outage and recovery lines go to.
    """

    _shared: ClassVar[dict[tuple[int, ConsulSettings], tuple[Engine, int]]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        settings: ConsulSettings,
        *,
        wait: float = 30.0,
        min_interval: float = 0.1,
        max_backoff: float = 1.0,
        log: logging.Logger = logger,
    ) -> None:
        if not wait > 0:
            raise ValueError(f"wait must be positive, not {wait!r}")
        if not (min_interval >= 0 and max_backoff > 0):
            raise ValueError("min_interval must be >= 0 and max_backoff > 0")
        self.settings = settings
        self.address = settings.address
        self.wait = wait
        self._wait_ms = max(1, round(wait * 1000))
        self.min_interval = min_interval
        self._max_backoff = max_backoff
        self._log = log
        self._extensions = request_extensions(settings)
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        #: how each watch builds its own one-connection client
        self._watch_options = {
            **client_options(settings, timeout=httpx.Timeout(10.0, read=wait + wait / 16 + 10)),
            "limits": one,
        }
        self._fetch_options = {
            **client_options(settings, timeout=httpx.Timeout(10.0)),
            "limits": one,
        }
        self._fetcher: httpx.AsyncClient | None = None  # engine thread only
        self._reset_listeners: tuple[Callable[[], None], ...] = ()
        self._reset = asyncio.Event()  # set and replaced on each reset (engine thread)
        self._reset_pending = False
        #: path -> whether Consul's ACLs removed entries from its last answer
        self.filtered: dict[str, bool] = {}
        #: loop time the current outage was noticed, or None (engine thread only)
        self._outage_since: float | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = _InlineResolvingLoop()
        self._thread = threading.Thread(target=self._run, name="meshlib-consul", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ one per process

    @classmethod
    def shared(cls, settings: ConsulSettings) -> Engine:
        """The process's engine for ``settings`` (made on first use); ``release`` it after.

        Keyed by process id too: a forked child gets its own (threads do not follow a fork).
        """
        key = (os.getpid(), settings)
        with cls._shared_lock:
            engine, users = cls._shared.get(key, (None, 0))
            if engine is None or engine.closed:
                engine, users = cls(settings), 0
            cls._shared[key] = (engine, users + 1)
            return engine

    def release(self) -> None:
        """Give back a ``shared`` engine; the last user's release closes it."""
        with self._shared_lock:
            for key, (engine, users) in list(self._shared.items()):
                if engine is self:
                    if users > 1:
                        self._shared[key] = (engine, users - 1)
                        return
                    del self._shared[key]
        self.close()

    # ------------------------------------------------------------------ any thread

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed

    @property
    def thread(self) -> threading.Thread:
        """The engine's thread."""
        return self._thread

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        """Run ``callback(*args)`` on the engine thread (nothing once it is closed)."""
        with suppress(RuntimeError):  # the loop is closed: nothing will ever run again
            self._loop.call_soon_threadsafe(callback, *args)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> Callable[[], None]:
        """Run ``coroutine`` as a task on the engine thread until it ends or ``close``.

        Returns a function that cancels it (from any thread).
        """
        holder: list[asyncio.Task[Any]] = []
        try:
            self._loop.call_soon_threadsafe(self._spawn, coroutine, holder)
        except RuntimeError:
            coroutine.close()
        return lambda: self.call_soon(_cancel, holder)

    def watch(
        self,
        path: str,
        answer: Callable[[Any, int], None],
        params: Mapping[str, str] | None = None,
        *,
        missing_ok: bool = False,
        failed: Callable[[str], None] | None = None,
        refused: Callable[[str], None] | None = None,
    ) -> Callable[[], None]:
        """Keep a blocking query on ``path`` going on the engine thread; returns its stop.

        ``answer(body, index)`` runs on that thread with each answer; raising from it counts
        as a bad answer (retried with backoff, the last good state kept). With
        ``missing_ok`` a 404 (a KV key or config entry that does not exist) answers
        ``None``. ``failed(reason)``, if given, is called after each query that brought no
        usable answer instead of the outage log: for a query another datacenter answers,
        whose failure says nothing about the agent. An ACL refusal (403) is no outage: it
        is logged once per distinct text, or handed to ``refused(line)``.
        """
        loop = self._blocking_loop(path, dict(params or {}), answer, missing_ok, failed, refused)
        return self.spawn(loop)

    def on_reset(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` on the engine thread whenever Consul is seen to restart.

        Returns a function that unsubscribes it (a closed user of a shared engine).
        """
        with self._lock:
            self._reset_listeners = (*self._reset_listeners, listener)

        def unsubscribe() -> None:
            with self._lock:
                self._reset_listeners = tuple(
                    known for known in self._reset_listeners if known is not listener
                )

        return unsubscribe

    def close(self) -> None:
        """Stop every watch and the thread; close the HTTP clients. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._stopping.set)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)
            if self._thread.is_alive():
                self._log.warning("the Consul watch thread did not stop within 10 s")

    # ------------------------------------------------------------------ the engine thread

    async def fetch(
        self, path: str, params: Mapping[str, str] | None = None, *, missing_ok: bool = False
    ) -> tuple[Any, int]:
        """One non-blocking read: ``(decoded JSON, X-Consul-Index)``; ``BadAnswer`` or an
        ``httpx.HTTPError`` when it fails. On the engine thread; reads share one connection."""
        if self._fetcher is None:
            self._fetcher = httpx.AsyncClient(**self._fetch_options)
        return await self._get(self._fetcher, path, params or {}, 0, missing_ok)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _main(self) -> None:
        try:
            await self._stopping.wait()
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._fetcher is not None:
                await self._fetcher.aclose()

    def _spawn(
        self, coroutine: Coroutine[Any, Any, None], holder: list[asyncio.Task[Any]] | None = None
    ) -> None:
        if self._stopping.is_set():
            coroutine.close()
            return
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        if holder is not None:
            holder.append(task)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("a Consul watch stopped", exc_info=task.exception())

    def _backoff(self, failures: int) -> float:
        base = max(self.min_interval, 0.05)
        return random.uniform(0, min(self._max_backoff, base * 2 ** min(failures, 32)))

    async def _blocking_loop(
        self,
        path: str,
        params: Mapping[str, str],
        answer: Callable[[Any, int], None],
        missing_ok: bool,
        failed: Callable[[str], None] | None,
        refused: Callable[[str], None] | None = None,
    ) -> None:
        """Query ``path`` forever, following Consul's blocking-query rules (module docstring)."""
        loop = asyncio.get_running_loop()
        index = 0
        seen = 0  # the newest index answered (an answer below it went backwards)
        failures = 0
        not_before = 0.0
        said = ""  # the ACL refusal last said by this watch
        fresh = False  # this query opens a new connection: block briefly (see below)
        client = httpx.AsyncClient(**self._watch_options)
        try:
            while True:
                delay = not_before - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # the rate limit: one query per min_interval
                sent = loop.time()
                not_before = sent + self.min_interval
                reset = self._reset
                try:
                    try:
                        get = self._get(client, path, params, index, missing_ok, fresh)
                        got = await self._unless_reset(get, reset)
                    except _Reconnected:
                        # A blocking query needed a new connection: the agent may have
                        # restarted since the last answer (its index lower than ours, so a
                        # full `wait` would be blind). Ask without blocking first (a lower
                        # index is a restart, at once), then block at most _FRESH_WAIT_MS on
                        # the new connection: the agent that answered the check may have
                        # been the old one, shutting down. A server that closes every
                        # connection makes such a watch ask twice a second, never blind.
                        index, fresh, not_before = 0, True, 0.0
                        continue
                    if got is None:  # another watch saw a restart: ask afresh, at once
                        self._log.debug("%s: dropped for the reset, asking again", path)
                        index, not_before = 0, 0.0
                        await client.aclose()  # the dropped query's connection is unusable
                        client = httpx.AsyncClient(**self._watch_options)
                        continue
                    body, new_index = got
                    if (failures and failed is None) or new_index < seen:
                        # an outage ended or the index went backwards: maybe a new agent,
                        # so the others re-ask too, and listeners hear it before the answer
                        self._signal_reset()
                    answer(body, new_index)
                except Exception as exc:  # any failure: keep the last state and retry
                    failures += 1
                    index = 0
                    if failed is None and isinstance(exc, Refused):
                        if str(exc) != said:  # a policy, not an outage: once per change
                            said = str(exc)
                            if refused is not None:
                                refused(said)
                            else:
                                self._log.error("cannot read %s from Consul: %s", path, exc)
                    elif failed is None:
                        self._failed(reason(exc), loop.time())
                    else:
                        failed(reason(exc))
                    backoff = self._backoff(failures)
                    self._log.debug(
                        "%s failed (%s); retrying in %.2f s", path, reason(exc), backoff
                    )
                    await asyncio.sleep(backoff)
                    continue
                failures = 0
                if said:
                    said = ""
                    self._log.info("%s is readable again", path)
                if failed is None:
                    self._recovered(sent)
                seen = new_index
                fresh = fresh and index == 0  # a blocking answer ends the fresh start
                index = _next_index(index, new_index)
        finally:
            await client.aclose()

    async def _unless_reset(
        self, request: Coroutine[Any, Any, tuple[Any, int]], reset: asyncio.Event
    ) -> tuple[Any, int] | None:
        """``request``'s answer, or None if a reset comes first (the request is cancelled)."""
        if reset.is_set():
            request.close()
            return None
        task = asyncio.ensure_future(request)
        waiter = asyncio.ensure_future(reset.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await task
            elif not task.cancelled():
                # Retrieved: a query that failed just as this watch was cancelled (the engine
                # stopping) is not reported as "Task exception was never retrieved".
                task.exception()
        if task.cancelled() or not task.done():
            return None
        return task.result()

    def _signal_reset(self) -> None:
        # Every signal drops the queries in flight: a second restart may follow the first
        # within a second (seen in tests), and a watch that re-asked the first agent would
        # be blind to the second. No ping-pong: a dropped query re-asks from 0, and an
        # answer after index 0 is never "backwards". Listeners hear once per burst.
        self._log.debug("Consul restarted or came back: every watch asks again from index 0")
        self._reset.set()
        self._reset = asyncio.Event()
        if self._reset_pending:
            return
        # now, before the answer that showed the restart is handled (a grace must start
        # before an empty registry is read); once for the watches answering in this burst
        self._reset_pending = True
        self._loop.call_soon(self._reset_told)
        for listener in self._reset_listeners:
            try:
                listener()
            except Exception:
                self._log.exception("reset listener %r failed", listener)

    def _reset_told(self) -> None:
        self._reset_pending = False

    async def _get(
        self,
        client: httpx.AsyncClient,
        path: str,
        params: Mapping[str, str],
        index: int,
        missing_ok: bool = False,
        fresh: bool = False,
    ) -> tuple[Any, int]:
        """One query; with ``index`` a blocking one, which may not open a new connection
        (``_Reconnected``) unless it is ``fresh``, and then blocks at most _FRESH_WAIT."""
        query = dict(params)
        extensions = self._extensions
        if index > 0:
            wait_ms = min(self._wait_ms, _FRESH_WAIT_MS) if fresh else self._wait_ms
            query.update(index=str(index), wait=f"{wait_ms}ms")
            if not fresh:
                extensions = {**extensions, "trace": _no_new_connection}
        response = await client.get(path, params=query, extensions=extensions)
        missing = missing_ok and response.status_code == 404
        refused = refusal(response.status_code, response.text)
        if refused is not None:
            raise Refused(refused)
        self.filtered[path] = response.headers.get(FILTERED_HEADER) == "true"
        if response.status_code != 200 and not missing:
            text = " ".join(response.text.split())[:200]
            raise BadAnswer(f"HTTP {response.status_code} {text}".rstrip())
        header = response.headers.get("X-Consul-Index")
        try:
            new_index = int(header or "")
        except ValueError:
            raise BadAnswer(f"X-Consul-Index {header!r} is not a number") from None
        if missing:
            return None, new_index
        try:
            body = response.json()
        except ValueError as exc:
            raise BadAnswer(f"malformed JSON ({exc})") from None
        return body, new_index

    def _failed(self, why: str, now: float) -> None:
        if self._outage_since is None:
            self._outage_since = now
            self._log.warning(
                "Consul at %s unreachable: %s; serving the last known endpoints",
                self.address,
                why,
            )

    def _recovered(self, sent: float) -> None:
        # Only an answer to a query sent after the outage began proves Consul is back: an
        # agent shutting down still answers some blocking queries already in flight (200 for
        # some paths, 500 for others), which would otherwise log "back" then "unreachable"
        # again within milliseconds.
        if self._outage_since is not None and sent >= self._outage_since:
            self._outage_since = None
            self._log.info("Consul at %s is reachable again", self.address)


#: how long a blocking query on a new connection may be held (see ``_blocking_loop``)
_FRESH_WAIT_MS = 1000


class _Reconnected(Exception):
    """A blocking query was about to open a new connection (see ``_blocking_loop``)."""


async def _no_new_connection(event: str, info: Mapping[str, Any]) -> None:
    """httpx's trace hook for blocking queries: refuse to open a connection for one."""
    if event == "connection.connect_tcp.started":
        raise _Reconnected


def _forked() -> None:
    # A fork may happen while another thread holds the registry's lock; the child has only
    # the forking thread, so it starts with a fresh lock (its engines are its own by pid).
    Engine._shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_forked)


def _cancel(holder: list[asyncio.Task[Any]]) -> None:
    for task in holder:
        task.cancel()


def _next_index(last: int, new: int) -> int:
    """The index for the next blocking query after an answer carrying ``new``."""
    if new < last:
        return 0  # went backwards: restart the loop with a query that answers at once
    if new <= 0:
        return 1  # never block on 0: it would answer at once, every time
    return new


def reason(exc: Exception) -> str:
    """A one-line reason for a failed Consul read."""
    text = str(exc)
    if isinstance(exc, BadAnswer):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _InlineResolvingLoop(asyncio.SelectorEventLoop):
    """An event loop that resolves host names on its own thread.

    asyncio runs ``getaddrinfo`` in its default thread pool, which starts up to
    ``min(32, cpus + 4)`` threads when several watches connect at once; the engine promises
    one thread. Only the agent's own address is ever resolved, once per new connection, and
    IP literals are not resolved at all.
    """

    async def getaddrinfo(
        self,
        host: bytes | str | None,
        port: bytes | str | int | None,
        *,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:
        return socket.getaddrinfo(host, port, family, type, proto, flags)
