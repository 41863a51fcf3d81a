"""``meshlib serve module:app``: run an app in the mesh, with a graceful drain.

ASGI apps run under uvicorn, WSGI apps under gunicorn (gthread workers: keep-alive, threads).
An app that does not wrap itself in the mesh middleware is wrapped, so the admin routes
(``/mesh/health`` for Consul's check, ``/mesh/metrics``, ``/mesh/status``) exist either
way, on the admin listener (``MESH_ADMIN_ADDR``, ``127.0.0.1`` and a free port unless set),
never on the app's port. Forwarded headers (``X-Forwarded-For``, ``Forwarded``) are never
trusted: the caller is the TCP peer.

The socket is bound here, before the server starts, so ``--port 0`` works (the port the
kernel picked is the one registered and printed) and the port is known before the app is
imported (``MESH_SERVICE_PORT`` is set for it).

Shutdown (SIGTERM, or Ctrl-C) runs the drain sequence of a zero-downtime deploy:

1. readiness goes 503 and the instance deregisters from Consul;
2. it keeps serving for ``MESH_SHUTDOWN_DELAY`` so callers' discovery drops it while it
   still answers (meshlib clients also retry a refused connection elsewhere);
3. the server stops accepting connections and waits up to ``MESH_DRAIN_TIMEOUT`` for
   requests in flight;
4. the process exits.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from .._config import MeshConfig, load_config
from .._exceptions import ConfigError
from .._logsafe import escaped
from .._runtime import Mesh
from ..instance import share_drain_with_workers
from ..security import NoServiceIdentity, TlsContexts
from ..security._refusals import PLAINTEXT_REFUSAL, RefusalLog, handshake_refusal
from ._asgi import ASGIMiddleware
from ._faults import FaultInjector
from ._inbound import ADMIN_REUSE_PORT_ENV
from ._lifespan import StartupErrors
from ._wsgi import WSGIMiddleware

__all__ = ["ServeError", "asgi_factory", "load_app", "serve"]

_TARGET_ENV = "MESHLIB_SERVE_TARGET"
#: where uvicorn workers write a ``ConfigError`` their app's startup raised
_STARTUP_ERRORS_ENV = "MESHLIB_SERVE_STARTUP_ERRORS"

logger = logging.getLogger("meshlib.tls")
_REFUSALS = RefusalLog(logger)


class ServeError(Exception):
    """``meshlib serve`` cannot run the target; the message is one line for the user.

    ``detail`` is what to show above that line: the traceback of the user's own code
    when importing their app raised.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def load_app(target: str) -> Any:
    """Import ``module:attribute`` (``module`` alone means ``module:app``)."""
    module_name, _, attribute = target.partition(":")
    attribute = attribute or "app"
    if not module_name:
        raise ServeError(f"{target!r} is not module:app (for example main:app)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ServeError(f"cannot import {module_name!r}: no such module") from exc
        raise ServeError(f"importing {module_name!r} failed: {exc}", _user_traceback(exc)) from exc
    except ConfigError:
        raise  # the mesh's configuration, not the app, is what failed: its own one line
    except Exception as exc:
        raise ServeError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}", _user_traceback(exc)
        ) from exc
    app = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise ServeError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(app):
        raise ServeError(f"{target!r} is a {type(app).__name__}, not an ASGI or WSGI application")
    return app


def _user_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` from the first frame outside importlib and meshlib: the
    user's own file and line, as Python would show them."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = (str(Path(__file__).resolve().parent.parent), "<frozen importlib", "importlib")
    keep = [f for f in frames if not any(part in f.filename for part in mine)]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(keep)]
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines)


def is_asgi(app: Any) -> bool:
    """ASGI apps are coroutine functions (or objects whose ``__call__`` is one)."""
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else type(app).__call__
    return inspect.iscoroutinefunction(call)


def meshed(app: Any, config: MeshConfig) -> Any:
    """``app`` wrapped in the mesh middleware, unless it already is."""
    if is_asgi(app):
        stack = getattr(app, "user_middleware", ())
        if isinstance(app, ASGIMiddleware) or any(
            getattr(m, "cls", None) is ASGIMiddleware for m in stack
        ):
            return app
        return ASGIMiddleware(app, config=config)
    if isinstance(app, WSGIMiddleware) or isinstance(
        getattr(app, "wsgi_app", None), WSGIMiddleware
    ):
        return app
    return WSGIMiddleware(app, config=config)


def asgi_factory() -> Any:
    """The app for uvicorn workers: the target, meshed (``factory=True``).

    A ``ConfigError`` in its startup is written to the supervisor's file (one JSON line)
    instead of a traceback in every worker: the supervisor reports it once and fails.
    """
    app = StartupErrors(
        meshed(load_app(os.environ[_TARGET_ENV]), load_config()), report=_report_to_supervisor
    )
    logging.getLogger("uvicorn.error").addFilter(app.quiet)
    return app


def _report_to_supervisor(error: ConfigError) -> None:
    path = os.environ.get(_STARTUP_ERRORS_ENV)
    if not path:
        return
    # one write to a file opened for appending: two workers failing at once do not mix lines
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (json.dumps(error.errors) + "\n").encode())
    finally:
        os.close(fd)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only when it does,
    # and without it every response waits ~40 ms for a delayed ACK (measured: 23 req/s).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(target: str, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> int:
    """Run ``target`` in the mesh until SIGTERM/SIGINT; returns the exit status."""
    _log_lifecycle()
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    os.environ.setdefault("MESH_SERVICE_PORT", str(port))
    if host not in ("0.0.0.0", "::", ""):
        os.environ.setdefault("MESH_SERVICE_ADDRESS", host)
    os.environ[_TARGET_ENV] = target
    admin = _reserve_admin_port(load_config().admin_addr or ("127.0.0.1", 0))
    config = load_config()
    # the file's fault settings are checked (and announced) now: a framework may build
    # its middleware only on the first request
    FaultInjector(config, follow_consul=False)
    # TLS material is loaded before the app is imported and the address announced: a
    # missing CA is the same one line for ASGI and WSGI, and nothing says "https" first.
    Mesh.for_config(config)
    app = meshed(load_app(target), config)
    kind = "asgi" if is_asgi(app) else "wsgi"
    shown = f"[{host}]" if ":" in host else host
    scheme = "http" if config.tls == "off" else "https"
    announcement = (
        f"meshlib serve: {config.service_name or target} ({kind}) on {scheme}://{shown}:{port} "
        f"pid {os.getpid()}, admin on {admin}"
    )
    if kind == "asgi":
        return _run_uvicorn(app, sock, config, workers, announcement)
    _announce(announcement)
    return _run_gunicorn(sock, config, workers)


def _announce(announcement: str) -> None:
    print(announcement, file=sys.stderr, flush=True)


def _log_lifecycle() -> None:
    """Show the instance's lifecycle (registered, draining, deregistered: once each) on
    stderr at INFO, unless the app configured logging for ``meshlib.server`` itself.

    Without a handler Python shows warnings only, so a registration went unseen.
    """
    lifecycle = logging.getLogger("meshlib.server")
    if lifecycle.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("meshlib serve: %(message)s"))
    lifecycle.addHandler(handler)
    lifecycle.propagate = False
    if lifecycle.level == logging.NOTSET or lifecycle.level > logging.INFO:
        lifecycle.setLevel(logging.INFO)


def _reserve_admin_port(address: tuple[str, int]) -> str:
    """Reserve the admin listener's port (port 0: pick one) for the serving processes.

    The socket is bound but never listens, so it takes no connections: each process that
    serves the app (the one uvicorn process, or every worker) binds the same port with
    ``SO_REUSEPORT`` and the kernel spreads probes and scrapes among them, as it spreads
    the app's connections. ``MESH_ADMIN_ADDR`` is set to the concrete address, so workers,
    Consul's check and the printed line agree. Returns the listener's URL.
    """
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(
            f"cannot reserve the admin port {host}:{port} (MESH_ADMIN_ADDR): {exc.strerror}"
        ) from exc
    _RESERVED.append(sock)  # held for the life of the process
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    os.environ["MESH_ADMIN_ADDR"] = f"{shown}:{port}"
    os.environ.pop("MESH_METRICS_ADDR", None)  # its deprecated alias, now folded in
    os.environ[ADMIN_REUSE_PORT_ENV] = f"{host}:{port}"
    return f"http://{shown}:{port}"


_RESERVED: list[socket.socket] = []


# --------------------------------------------------------------------------- uvicorn


def _run_uvicorn(
    app: Any, sock: socket.socket, config: MeshConfig, workers: int, announcement: str
) -> int:
    """Serve ``app``; one process announces its address once the app's startup succeeded
    (a ``ConfigError`` there is raised here, for its one line: ``_lifespan.py``)."""
    import uvicorn

    common: dict[str, Any] = {
        "lifespan": "on",
        "timeout_graceful_shutdown": config.drain_timeout,
        "log_level": "warning",
        "access_log": False,
        # the peer is the TCP peer: X-Forwarded-For from anyone never replaces it
        "proxy_headers": False,
        "forwarded_allow_ips": "",
        # uvloop when it is installed (meshlib[fast]), asyncio's loop otherwise: the loop's
        # own TLS serves mesh TLS (_tls_uvicorn.py), and uvloop's is C. The HTTP parser
        # stays h11 either way (_http_guard.py says why).
        "loop": "auto",
    }
    tls = Mesh.for_config(config).security.tls
    if tls is not None:
        from ._tls_uvicorn import mesh_protocol

        common["http"] = mesh_protocol(tls)
    else:
        from ._http_guard import GuardedH11Protocol

        common["http"] = GuardedH11Protocol  # h11 with limits: see _http_guard.py
    if workers > 1:
        multi = uvicorn.Config(
            "meshlib.server._serve:asgi_factory", factory=True, workers=workers, **common
        )
        # uvicorn's supervisor runs a plain uvicorn.Server per worker, so with several
        # workers the order is uvicorn's: stop accepting, finish in-flight requests, then
        # lifespan shutdown, where the middleware deregisters. Callers using meshlib retry
        # the refused connections elsewhere; one worker gets the full drain sequence.
        return _run_uvicorn_workers(multi, sock, announcement)
    startup = StartupErrors(app)
    logging.getLogger("uvicorn.error").addFilter(startup.quiet)
    server = _MeshUvicorn(uvicorn.Config(startup, **common))
    server.announcement = announcement
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's own exit when the app's startup failed
        if startup.config_error is not None:
            raise startup.config_error from None
        raise
    return 0


try:
    import uvicorn as _uvicorn
except ImportError:  # pragma: no cover - the `server` extra is not installed
    _uvicorn = None  # type: ignore[assignment]


def _run_uvicorn_workers(config: Any, sock: socket.socket, announcement: str) -> int:
    """Run uvicorn's supervisor; announce once every worker's app has started.

    A worker whose startup fails exits with uvicorn's ``STARTUP_FAILURE`` and the
    supervisor stops (uvicorn 0.30+). A ``ConfigError`` the workers wrote to the shared file
    is raised here, for the same one line as with one worker; any other failure is a
    failed exit after uvicorn's own report.
    """
    from uvicorn.config import STARTUP_FAILURE

    fd, errors = tempfile.mkstemp(prefix="meshlib-serve-", suffix=".errors")
    os.close(fd)
    os.environ[_STARTUP_ERRORS_ENV] = errors
    supervisor = _MeshMultiprocess(config, sockets=[sock])
    supervisor.announcement = announcement
    quiet = _SupervisorQuiet(Path(errors))
    logging.getLogger("uvicorn.error").addFilter(quiet)
    try:
        supervisor.run()
        reported = quiet.reported()
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
        os.environ.pop(_STARTUP_ERRORS_ENV, None)
        Path(errors).unlink(missing_ok=True)
    if reported:
        raise ConfigError(reported)
    return 1 if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0


class _SupervisorQuiet:
    """Drops the supervisor's "failed to start" line when a worker wrote a ``ConfigError``
    (its one line says more), and reads that error."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def reported(self) -> list[str]:
        try:
            first = self.path.read_text().split("\n", 1)[0]
        except OSError:
            return []
        return [str(line) for line in json.loads(first)] if first else []

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to start" not in record.getMessage() or not self.reported()


if _uvicorn is not None:

    class _MeshUvicorn(_uvicorn.Server):
        """uvicorn, with the mesh's drain before it stops accepting connections."""

        _draining = False
        announcement = ""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and self.announcement:
                _announce(self.announcement)  # the app is up: its address is news now

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self._draining or self.should_exit:
                super().handle_exit(sig, frame)  # a second signal: stop now
                return
            self._draining = True
            threading.Thread(
                target=self._drain_then_exit, args=(sig, frame), name="meshlib-drain", daemon=True
            ).start()

        def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
            config = load_config()
            Mesh.for_config(config).instance.begin_drain()
            time.sleep(config.shutdown_delay)  # deliberate: callers drop us meanwhile
            super().handle_exit(sig, frame)

    from uvicorn.supervisors import Multiprocess as _Multiprocess

    class _MeshMultiprocess(_Multiprocess):
        """uvicorn's supervisor, announcing the address once every worker has started."""

        announcement = ""

        def keep_subprocess_alive(self) -> None:
            super().keep_subprocess_alive()
            if not self.announcement or self.should_exit.is_set():
                return
            if all(process.is_ready(timeout=1) for process in self.processes):
                _announce(self.announcement)
                self.announcement = ""


# --------------------------------------------------------------------------- gunicorn


def _run_gunicorn(sock: socket.socket, config: MeshConfig, workers: int) -> int:
    from gunicorn.app.base import BaseApplication

    share_drain_with_workers()
    instance = Mesh.for_config(config).instance
    address, port = sock.getsockname()[:2]

    def when_ready(arbiter: Any) -> None:
        instance.start(address=address, port=port)
        graceful = signal.getsignal(signal.SIGTERM)

        def drain_then_stop(sig: int, frame: FrameType | None) -> None:
            def run() -> None:
                instance.begin_drain()
                time.sleep(config.shutdown_delay)  # deliberate: callers drop us meanwhile
                if callable(graceful):
                    graceful(sig, frame)

            threading.Thread(target=run, name="meshlib-drain", daemon=True).start()

        signal.signal(signal.SIGTERM, drain_then_stop)
        signal.signal(signal.SIGINT, drain_then_stop)

    def post_worker_init(worker: Any) -> None:
        # each worker answers the admin routes itself, on the shared reserved port
        app = worker.wsgi
        middleware = app if isinstance(app, WSGIMiddleware) else getattr(app, "wsgi_app", None)
        if isinstance(middleware, WSGIMiddleware):
            middleware.start(address=address, port=port)

    options: dict[str, Any] = {
        # gunicorn wraps the fd in a socket object of its own and closes it at shutdown:
        # ours must let go of it, or its close at exit closed whatever reused the number
        # (the Consul connection that deregistered: two "Bad file descriptor" tracebacks)
        "bind": [f"fd://{sock.detach()}"],
        "post_worker_init": post_worker_init,
        "forwarded_allow_ips": "",  # never trust X-Forwarded-* (the peer is the TCP peer)
        "workers": workers,
        # gthread, with a deadline on reading a request's headers (_gunicorn_worker.py)
        "worker_class": "meshlib.server._gunicorn_worker.GuardedThreadWorker",
        "threads": 8,
        "graceful_timeout": max(1, math.ceil(config.drain_timeout)),  # gunicorn wants an int
        "keepalive": 5,
        "loglevel": "warning",
        "when_ready": when_ready,
        "reuse_port": False,
    }
    tls = Mesh.for_config(config).security.tls
    if tls is not None:
        options.update(_gunicorn_tls(tls))

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return meshed(load_app(os.environ[_TARGET_ENV]), load_config())

    _Gunicorn().run()
    return 0


def _gunicorn_tls(tls: TlsContexts) -> dict[str, Any]:
    """gunicorn options for mesh TLS: its ``ssl_context`` hook, asked per connection.

    gunicorn wraps each accepted socket with the context the hook returns; the one returned
    here looks at the first byte first, and hands back the plain socket for a plaintext
    client in permissive mode (closing it in strict mode), or the TLS socket made with the
    newest rotated context. ``certfile``/``keyfile`` only switch gunicorn's TLS path on:
    they hold the public certificate and a throwaway key, never the mesh key.
    """
    directory = Path(tempfile.mkdtemp(prefix="meshlib-gunicorn-"))
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(tls.material.cert_pem)
    keyfile.write_bytes(_throwaway_key())
    os.chmod(keyfile, 0o600)
    sniffing = _SniffingContext(tls)
    return {
        "certfile": str(certfile),
        "keyfile": str(keyfile),
        "do_handshake_on_connect": True,
        "ssl_context": lambda conf, default: sniffing,
    }


class _SniffingContext:
    """Duck-types ``SSLContext.wrap_socket`` for gunicorn (see ``_gunicorn_tls``).

    A refused connection raises ``ECONNRESET``, which gunicorn logs at debug level only:
    the refusal's own line is enough, without a traceback per connection. A failed
    handshake is such a refusal, with its reason (``handshake_refusal``).
    """

    def __init__(self, tls: TlsContexts) -> None:
        self._tls = tls

    def wrap_socket(self, sock: socket.socket, **kwargs: Any) -> socket.socket:
        sock.settimeout(10.0)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        finally:
            sock.settimeout(None)
        if first == b"\x16":
            peer = _peername(sock)  # the socket is detached once wrapped
            try:
                wrapped = self._tls.server.wrap_socket(sock, **kwargs)  # the handshake runs here
            except OSError as exc:
                reason = handshake_refusal(exc)
                if reason is not None:
                    _REFUSALS.refused(reason, peer)
                sock.close()
                raise OSError(errno.ECONNRESET, f"TLS handshake failed: {exc}") from None
            try:
                self._tls.caller(wrapped.getpeercert())
            except NoServiceIdentity as exc:
                _REFUSALS.refused(escaped(str(exc)), peer)
                wrapped.close()
                raise OSError(errno.ECONNRESET, f"TLS connection refused: {exc}") from None
            return wrapped
        if self._tls.mode == "strict":
            _REFUSALS.refused("plaintext at a MESH_TLS=strict port", _peername(sock))
            _answer_and_close(sock)
            raise OSError(errno.ECONNRESET, "plaintext connection refused (MESH_TLS=strict)")
        return sock


def _answer_and_close(sock: socket.socket) -> None:
    """Tell a plaintext caller why, then close without a reset: the request's bytes are
    read first (closing with unread data sends RST, which can beat the answer)."""
    try:
        sock.settimeout(1.0)
        sock.recv(65536)
        sock.sendall(PLAINTEXT_REFUSAL)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)  # until the caller closes (or the timeout)
    except OSError:
        pass
    finally:
        sock.close()


def _peername(sock: socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return None


def _throwaway_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
