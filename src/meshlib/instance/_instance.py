"""The life of this server instance: starting, ready, draining, stopped.

One ``Instance`` per process and configuration, owned by the process's ``Mesh``
(``mesh.instance``) and so shared by every middleware and by ``meshlib serve``. It counts
requests in flight, answers readiness, registers with Consul when it starts (Consul
discovery only: static mode registers nothing) and, on shutdown, goes unready and
deregisters *before* the server stops accepting connections, so callers stop picking it
while it still answers, then waits for requests in flight to finish.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import threading
import time
from typing import Any, Literal

from .._acl import Refused
from .._config import MeshConfig
from .._exceptions import ConfigError
from ..telemetry._admin import admin_listener
from ._registration import Registration

__all__ = ["Instance", "share_drain_with_workers"]

logger = logging.getLogger("meshlib.server")

State = Literal["starting", "ready", "draining", "stopped"]

#: seconds between attempts to register while the Consul agent cannot be reached
_REGISTER_RETRY = 2.0


class Instance:
    """This process's place in the mesh as a server."""

    def __init__(self, config: MeshConfig) -> None:
        if config.discovery == "consul" and not config.service_name:
            raise ConfigError(
                "MESH_SERVICE_NAME is unset: expected the name this server registers under "
                "in Consul (or MESH_DISCOVERY=static)"
            )
        self.config = config
        self._state: State = "starting"
        self.in_flight = 0
        self.registration: Registration | None = None
        self._changed = threading.Condition()
        self._start_lock = threading.Lock()
        self._stopping = threading.Event()
        self._register_failed = False
        self._registered = False

    # ---------------------------------------------------------------- requests

    def request_started(self) -> None:
        """Count one request in flight."""
        with self._changed:
            self.in_flight += 1

    def try_request_started(self, limit: int | None) -> bool:
        """Count one request in flight unless ``limit`` are already (then False).

        Checked and counted under one lock, so concurrent requests cannot both take the
        last slot; ``request_finished`` gives it back.
        """
        with self._changed:
            if limit is not None and self.in_flight >= limit:
                return False
            self.in_flight += 1
            return True

    def request_finished(self) -> None:
        """Count one request done."""
        with self._changed:
            self.in_flight -= 1
            if not self.in_flight:
                self._changed.notify_all()

    @property
    def state(self) -> State:
        """``starting``, ``ready``, ``draining`` or ``stopped``.

        A worker process of a pre-forking server also reads ``draining`` from its parent
        (see ``share_drain_with_workers``), because its parent is the one told to stop.
        """
        if self._state == "ready" and _shared_drain is not None and _shared_drain.value:
            return "draining"
        return self._state

    @property
    def registered(self) -> bool:
        """Whether discovery lists this instance: registered in Consul (until the drain),
        or nothing to register (static discovery)."""
        registered = self._registered or (
            _shared_registered is not None and bool(_shared_registered.value)
        )  # a worker of a pre-forking server reads its parent's registration
        return self.registration is None or (registered and self.state == "ready")

    @property
    def ready(self) -> bool:
        """Whether this instance should receive traffic (``/mesh/health`` says 200)."""
        return self.state == "ready"

    # ---------------------------------------------------------------- lifecycle

    def start(self, *, address: str | None = None, port: int | None = None) -> None:
        """Become ready and, with Consul discovery, register. Idempotent.

        ``address``/``port`` are what the server actually listens on; ``MESH_SERVICE_ADDRESS``
        and ``MESH_SERVICE_PORT`` override them.
        """
        with self._start_lock:
            if self._state != "starting":
                return
            config = self.config
            port = config.service_port or port
            if config.discovery == "consul" and config.consul is not None:
                if port is None:
                    logger.warning(
                        "%s is not registered in Consul: the port it serves on is unknown; "
                        "set MESH_SERVICE_PORT or run it with `meshlib serve`",
                        config.service_name,
                    )
                else:
                    registered_address = config.service_address or _routable(address)
                    self.registration = Registration(
                        config,
                        config.consul,
                        address=registered_address,
                        port=port,
                        admin=_admin_address(config),
                    )
            self._state = "ready"
            if self.registration is not None:
                atexit.register(self._deregister_at_exit)
                if not self._register():
                    threading.Thread(
                        target=self._keep_registering, name="meshlib-register", daemon=True
                    ).start()

    def _register(self) -> bool:
        """Try to register; on failure say so (once) and return False."""
        assert self.registration is not None
        try:
            self.registration.register()
        except Exception as exc:
            if not self._register_failed:
                self._register_failed = True
                logger.warning(
                    "could not register %s in Consul (%s); serving anyway and retrying every %gs",
                    self.config.service_name,
                    exc if isinstance(exc, Refused) else f"{type(exc).__name__}: {exc}",
                    _REGISTER_RETRY,
                )
            return False
        self._registered = True
        if _shared_registered is not None:
            _shared_registered.value = True
        if self._register_failed:
            logger.info("registered %s in Consul after all", self.config.service_name)
        self.registration.follow(self._registration_lost)
        return True

    def _registration_lost(self) -> None:
        """Consul no longer lists this instance (its agent restarted empty): register again."""
        if self._state != "ready":
            return
        logger.warning(
            "%s is no longer in Consul's catalog (did its agent restart?); registering again",
            self.config.service_name,
        )
        threading.Thread(target=self._register_again, name="meshlib-register", daemon=True).start()

    def _register_again(self) -> None:
        if not self._register():
            self._keep_registering()

    def _keep_registering(self) -> None:
        """Retry registration until it works or the instance drains (Consul agent restarts)."""
        while not self._stopping.wait(_REGISTER_RETRY):
            if self._state != "ready" or self._register():
                return

    def begin_drain(self) -> None:
        """Go unready and deregister; requests keep being served. Idempotent."""
        with self._start_lock:
            if self._state in ("draining", "stopped"):
                return
            self._state = "draining"
            self._stopping.set()
            if _shared_drain is not None:
                _shared_drain.value = True
        if self.registration is None or self.registration.owned_here:
            logger.info(
                "%s draining: %d request(s) in flight", self.config.service_name, self.in_flight
            )
        if self.registration is not None:
            self.registration.deregister()

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Block until no request is in flight (True) or ``timeout`` passes (False)."""
        timeout = self.config.drain_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def stop(self) -> None:
        """Drain (if not yet), wait for requests in flight, and release resources."""
        self.begin_drain()
        if not self.wait_drained():
            logger.warning(
                "%s: %d request(s) still in flight after the drain timeout",
                self.config.service_name,
                self.in_flight,
            )
        self._state = "stopped"
        if self.registration is not None:
            self.registration.close()

    def close(self) -> None:
        """Let go of this instance without a drain (its ``Mesh`` closed): stop retrying and
        following the registration; the registration itself stays to the server's ``stop``."""
        self._stopping.set()
        if self._state != "stopped":
            self._state = "stopped"
            atexit.unregister(self._deregister_at_exit)
            if self.registration is not None:
                self.registration.close()

    @property
    def stopped(self) -> bool:
        """Whether ``stop`` or ``close`` ended this instance (its mesh then makes a new one)."""
        return self._state == "stopped"

    def _deregister_at_exit(self) -> None:
        if self._state in ("starting", "ready"):
            self.begin_drain()


def _admin_address(config: MeshConfig) -> tuple[str, int] | None:
    """Where this process's admin listener is (or will be, under ``meshlib serve``)."""
    listener = admin_listener()
    if listener is not None:
        return listener.host, listener.port
    if config.admin_addr is not None and config.admin_addr[1]:
        return config.admin_addr
    return None


def _routable(address: str | None) -> str:
    """The address to register: empty for a wildcard (Consul then uses the node's)."""
    if address in (None, "", "0.0.0.0", "::"):
        return ""
    return address or ""


#: Set in a pre-forking server's parent before its workers start; shared memory, so the
#: workers' health checks see the parent's drain.
_shared_drain: Any = None
_shared_registered: Any = None


def share_drain_with_workers() -> None:
    """Call in the parent of a pre-forking server (gunicorn) before workers are forked."""
    global _shared_drain, _shared_registered
    if _shared_drain is None:
        _shared_drain = multiprocessing.RawValue(ctypes.c_bool, False)
        _shared_registered = multiprocessing.RawValue(ctypes.c_bool, False)
