"""Registering this instance with the local Consul agent, and removing it again.

Uses py-consul (its agent API covers registration with a check), set up to reach the agent
as every other feature does (``_client``: the token, CA and client certificate of
``ConsulSettings``, and the TLS server name, which requests cannot set by itself). The
registration carries what the rest of the mesh reads: the address and port actually served,
``Meta.version`` (subsets and canaries select on it), tags, ``Connect: {Native: true}`` (a
meshlib server speaks the mesh's mTLS itself, so Consul's own proxies may call it directly),
and an HTTP check on ``/mesh/health`` of the admin listener (plaintext, so it works under
strict mTLS) with ``DeregisterCriticalServiceAfter`` so an instance that crashed without
deregistering is removed by Consul itself.

``follow`` keeps the registration true: a blocking query on the service's catalog entry
(on the process's one Consul watcher) notices when Consul forgets the instance, as a dev
agent or a rebuilt client agent does when it restarts, and says so, so it registers again.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from .._acl import Refused, refusal
from .._config import ConsulSettings, MeshConfig
from .._version import __version__
from ..consul import Engine

__all__ = ["Registration"]

logger = logging.getLogger("meshlib.server")


class Registration:
    """One instance's registration in Consul."""

    def __init__(
        self,
        config: MeshConfig,
        settings: ConsulSettings,
        *,
        address: str,
        port: int,
        admin: tuple[str, int] | None = None,
    ) -> None:
        assert config.service_name is not None
        self.service = config.service_name
        self.address = address
        self.port = port
        host = address or socket.gethostname()
        self.service_id = f"{self.service}-{host}-{port}"
        check_host = address or "127.0.0.1"
        check_host = f"[{check_host}]" if ":" in check_host else check_host
        self._check: dict[str, Any] = {
            "Interval": _go_duration(config.health_interval),
            "Timeout": _go_duration(min(config.health_interval, 5.0)),
            "DeregisterCriticalServiceAfter": _go_duration(config.deregister_after),
        }
        if admin is not None:
            # the admin listener speaks plaintext whatever MESH_TLS says, so Consul's
            # checker (which has no mesh certificate) can ask it under strict mTLS too
            admin_host = admin[0] if admin[0] not in ("", "0.0.0.0", "::") else "127.0.0.1"
            admin_host = f"[{admin_host}]" if ":" in admin_host else admin_host
            self._check["HTTP"] = f"http://{admin_host}:{admin[1]}/mesh/health"
        else:  # no admin listener known: at least check the port
            self._check["TCP"] = f"{check_host}:{port}"
        meta = {"meshlib": __version__, "mesh-tls": config.tls}
        if admin is not None:  # where Prometheus (Consul service discovery) scrapes
            meta["admin-port"] = str(admin[1])
        if config.service_version:
            meta["version"] = config.service_version
        self._meta = meta
        self._tags = list(config.service_tags)
        # py-consul (and requests under it, some 6 MiB) loads only in a process that
        # registers, not in every process that imports meshlib
        from ._py_consul import agent_client

        self._client = agent_client(settings)
        self._settings = settings
        self._following: tuple[Engine, Callable[[], None]] | None = None
        #: the process that registers and deregisters: a pre-forking server's workers
        #: inherit this object and must leave both to their parent (once each, not per worker)
        self._owner = os.getpid()

    def register(self) -> None:
        """Register (idempotent: the same ID replaces the previous registration)."""
        if os.getpid() != self._owner:
            return
        from consul import ACLPermissionDenied

        try:
            self._client.agent.service.register(
                self.service,
                service_id=self.service_id,
                address=self.address,
                port=self.port,
                tags=self._tags,
                meta=self._meta,
                check=self._check,
                connect={"Native": True},
            )
        except ACLPermissionDenied as exc:
            raise Refused(refusal(403, str(exc))) from None
        logger.info("registered %s in Consul as %s", self.service, self.service_id)

    def deregister(self) -> None:
        """Remove the registration; errors are logged, never raised (we are shutting down)."""
        if os.getpid() != self._owner:
            return
        try:
            self._client.agent.service.deregister(self.service_id)
        except Exception as exc:
            logger.warning("could not deregister %s from Consul: %s", self.service_id, exc)
        else:
            logger.info("deregistered %s from Consul", self.service_id)

    @property
    def owned_here(self) -> bool:
        """Whether this process registered (not a worker that inherited the object)."""
        return os.getpid() == self._owner

    def follow(self, lost: Callable[[], None]) -> None:
        """Call ``lost()`` (on the watch thread) whenever Consul stops listing this instance
        after it had listed it. Once per process; ``close`` stops it."""
        if self._following is not None or not self.owned_here:
            return
        engine = Engine.shared(self._settings)
        listed = False

        def answer(body: Any, index: int) -> None:
            nonlocal listed
            entries = body if isinstance(body, list) else []
            if any(isinstance(e, dict) and e.get("ServiceID") == self.service_id for e in entries):
                listed = True
            elif listed:
                listed = False
                lost()

        stop = engine.watch(f"/v1/catalog/service/{quote(self.service, safe='')}", answer)
        self._following = (engine, stop)

    def close(self) -> None:
        """Stop following the catalog; release the HTTP session."""
        following, self._following = self._following, None
        if following is not None:
            engine, stop = following
            stop()
            engine.release()
        self._client.http.session.close()


def _go_duration(seconds: float) -> str:
    """Consul's duration strings: whole milliseconds."""
    return f"{round(seconds * 1000)}ms"
