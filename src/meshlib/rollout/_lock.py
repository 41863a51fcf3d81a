"""One controller per service: a Consul session holding ``meshlib/rollouts/<service>/lock``.

The session has a TTL the holder renews from a background thread, so a controller that dies
loses the lock by itself (Consul invalidates a session within twice its TTL). On the same
host a dead holder is noticed at once: the lock's value names its PID and host, and a lock
whose process is gone is taken over immediately instead of after the TTL. The lock alone
is not trusted for correctness: every state write is also a check-and-set.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

from ._consul import ConsulAPI, RolloutError
from ._state import key_prefix

__all__ = ["ControllerLock", "Holder"]

#: Consul's shortest session TTL; a dead controller on another host is replaced within 2x.
SESSION_TTL = 10.0


class Holder(dict[str, Any]):
    """Who holds a lock: ``pid``, ``host``, ``since`` (the lock's JSON value)."""

    def describe(self) -> str:
        """``pid 1234 on host web-1 since 19:40:01 UTC``."""
        since = time.strftime("%H:%M:%S", time.gmtime(float(self.get("since", 0))))
        return f"pid {self.get('pid')} on host {self.get('host')} since {since} UTC"

    def dead_here(self) -> bool:
        """The holder ran on this host and its process is gone."""
        if self.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(self.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False


class ControllerLock:
    """The exclusive right to drive one service's rollout."""

    def __init__(self, api: ConsulAPI, service: str) -> None:
        self.api = api
        self.service = service
        self.path = f"/v1/kv/{key_prefix(service)}/lock"
        self.session: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def holder(self) -> Holder | None:
        """The current holder, or None when the lock is free."""
        body, _ = self.api.call("GET", self.path, missing_ok=True)
        if not body or not body[0].get("Session"):
            return None
        try:
            value = json.loads(base64.b64decode(body[0].get("Value") or b""))
        except ValueError:
            value = {}
        holder = Holder(value if isinstance(value, dict) else {})
        holder["session"] = body[0]["Session"]
        return holder

    def acquire(self) -> Holder | None:
        """Take the lock; on failure return who holds it (and take nothing)."""
        created, _ = self.api.call(
            "PUT",
            "/v1/session/create",
            body={
                "Name": f"meshlib-rollout-{self.service}",
                "TTL": f"{SESSION_TTL:g}s",
                "Behavior": "release",
                # No lock-delay: a replacement may take over at once; CAS guards the state.
                "LockDelay": "0s",
            },
        )
        self.session = str(created["ID"])
        value = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        for _ in range(2):
            ok, _ = self.api.call(
                "PUT", self.path, params={"acquire": self.session}, content=value.encode()
            )
            if ok is True:
                self._renewer = threading.Thread(
                    target=self._renew, name="meshlib-rollout-lock", daemon=True
                )
                self._renewer.start()
                return None
            holder = self.holder()
            if holder is None:
                continue  # released between our attempt and the read
            if not holder.dead_here():
                self._destroy()
                return holder
            # The holder died on this host: end its session rather than wait out the TTL.
            self.api.call("PUT", f"/v1/session/destroy/{holder['session']}")
        self._destroy()
        raise RolloutError(f"could not take the controller lock of {self.service!r}")

    def release(self) -> None:
        """Give the lock up (and end the session)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(5)
        if self.session is not None:
            try:
                self.api.call("PUT", self.path, params={"release": self.session})
            except RolloutError:
                pass  # Consul away or the session gone: the TTL frees the lock anyway
            finally:
                self._destroy()

    def _destroy(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            # as above: if Consul cannot be reached, the session ends by its TTL
            with contextlib.suppress(RolloutError):
                self.api.call("PUT", f"/v1/session/destroy/{session}")

    def _renew(self) -> None:
        while not self._stop.wait(SESSION_TTL / 3):
            session = self.session
            if session is None:
                return
            try:
                body, _ = self.api.call("PUT", f"/v1/session/renew/{session}", missing_ok=True)
            except RolloutError:
                continue  # Consul unreachable for a moment: the TTL leaves room to retry
            if not body:
                self.lost.set()  # invalidated: another controller may hold the lock now
                return
