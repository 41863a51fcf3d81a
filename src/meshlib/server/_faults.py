"""Fault injection for resilience testing: delay and/or abort a share of inbound requests.

Off unless configured, and loudly logged (one WARNING naming every setting) when on.
Settings come from the environment (``MESH_FAULT_*``) or from the local config file
(``MESH_CONFIG_FILE``), whose top-level ``faults`` object holds one entry per service::

    {"faults": {"forecast": {"delay": "200ms", "delay_percent": 10,
                             "abort_status": 503, "abort_percent": 5,
                             "header": "x-mesh-fault=on"}}}

**The file wins**: when it has an entry for this service, that entry replaces the
environment's settings as a whole (``{}`` turns faults off), because the file is re-read
while the server runs and the environment is not: an operator can start, change and stop
an experiment without a restart, including one the environment started. Without an entry
for this service, the environment's settings apply.

With Consul discovery, Consul's KV store is the config store: the same entry as JSON at
``meshlib/faults/<service>`` is followed with a blocking query (from the first request
on, so a forked worker watches for itself) and wins over the file and the environment
while the key exists::

    consul kv put meshlib/faults/forecast '{"abort_status": 503, "abort_percent": 5}'
    consul kv delete meshlib/faults/forecast     # back to the file / environment

The file is checked at most every half second from the request path (a ``stat``; read
only when it changed); a malformed ``faults`` entry, in the file or in Consul, is refused
with one logged error and the last good settings stay.

Each eligible request (all, or only those carrying ``header``) is delayed with probability
``delay_percent`` and aborted with probability ``abort_percent``, independently, delay
first, as Envoy's fault filter does. An injected fault is marked on the response with
``x-mesh-fault: delay``, ``abort`` or ``delay, abort``, so nobody mistakes it for a real
failure.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import quote

from .._config import Faults, MeshConfig, parse_duration, parse_fault_header
from .._watched_file import WatchedFile
from ..consul import Engine

__all__ = [
    "FAULT_RESPONSE_HEADER",
    "KV_PREFIX",
    "FaultDecision",
    "FaultInjector",
    "parse_faults",
]

#: Consul KV prefix of per-service fault entries (Consul discovery).
KV_PREFIX = "meshlib/faults/"

logger = logging.getLogger("meshlib.server")

#: Marks a response whose request got an injected fault.
FAULT_RESPONSE_HEADER = "x-mesh-fault"

#: (service, source, settings) already announced by this process
_announced: set[tuple[str, str, Faults]] = set()

_KEYS = {"delay", "delay_percent", "abort_status", "abort_percent", "header"}


class FaultDecision(NamedTuple):
    """What to do to one request."""

    #: seconds to wait before the handler (0: none)
    delay: float
    #: status to answer instead of running the handler (None: run it)
    abort_status: int | None

    @property
    def marker(self) -> str:
        """The ``x-mesh-fault`` response header value."""
        kinds = []
        if self.delay:
            kinds.append("delay")
        if self.abort_status is not None:
            kinds.append("abort")
        return ", ".join(kinds)


def parse_faults(entry: object, where: str) -> Faults:
    """One service's ``faults`` entry from the config file; ``ValueError`` naming the problem."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object")
    unknown = set(entry) - _KEYS
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)} (known: {sorted(_KEYS)})")

    def percent(key: str) -> float | None:
        value = entry.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
            raise ValueError(f"{where}.{key} must be a number from 0 to 100, not {value!r}")
        return float(value) / 100

    delay: float | None = None
    if entry.get("delay") is not None:
        try:
            delay = parse_duration(str(entry["delay"]))
        except ValueError:
            raise ValueError(
                f"{where}.delay must be a duration such as 200ms, not {entry['delay']!r}"
            ) from None
    status = entry.get("abort_status")
    if status is not None and (
        isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599
    ):
        raise ValueError(f"{where}.abort_status must be an HTTP status from 400 to 599")
    delay_percent, abort_percent = percent("delay_percent"), percent("abort_percent")
    if delay is None and delay_percent is not None:
        raise ValueError(f"{where}.delay_percent needs a delay")
    if status is None and abort_percent is not None:
        status = 503
    header = None
    if entry.get("header") is not None:
        try:
            header = parse_fault_header(str(entry["header"]))
        except ValueError:
            raise ValueError(
                f"{where}.header must be a header name or 'name=value', not {entry['header']!r}"
            ) from None
    return Faults(
        delay=delay,
        delay_percent=1.0 if delay_percent is None else delay_percent,
        abort_status=status,
        abort_percent=1.0 if abort_percent is None else abort_percent,
        header=header,
    )


def _from_text(text: str, service: str) -> Faults | None:
    """This service's entry in the file's text, None if it has none; ``ValueError`` if
    malformed."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    section = document.get("faults") if isinstance(document, dict) else None
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ValueError("faults must be an object of service names")
    if service not in section:
        return None
    return parse_faults(section[service], f"faults.{service}")


def _from_kv(body: object, service: str) -> Faults:
    """This service's entry from Consul's KV answer (a list of one base64 value)."""
    if not isinstance(body, list) or len(body) != 1 or not isinstance(body[0], dict):
        raise ValueError("expected one KV entry")
    raw = body[0].get("Value")
    try:
        entry = json.loads(base64.b64decode(raw or b"", validate=True) or b"{}")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    return parse_faults(entry, f"{KV_PREFIX}{service}")


class FaultInjector:
    """Decides, per request, whether to inject a fault; thread-safe."""

    def __init__(
        self,
        config: MeshConfig,
        *,
        check_interval: float = 0.5,
        rng: random.Random | None = None,
        follow_consul: bool = True,
    ) -> None:
        self._env = config.faults
        #: Consul KV: followed with Consul discovery (``follow_consul``), started lazily
        self._consul = config.consul if follow_consul and config.discovery == "consul" else None
        self._watcher: Any = None
        self._watcher_pid = 0
        #: this service's KV entry (None: no key), and the file/environment's choice
        self._kv: Faults | None = None
        self._kv_refused = ""
        self._local: tuple[Faults, str] = (self._env, "the environment")
        self._service = config.service_name or ""
        self._random = (rng or random.Random()).random
        self._lock = threading.Lock()
        self.source = "the environment"
        self.faults = self._env
        #: the config file's faults entry for this service, followed as the file changes
        self._file: WatchedFile[Faults | None] | None = None
        path = config.config_file
        if path is not None and self._service:
            service = self._service
            try:
                self._file = WatchedFile(
                    path,
                    lambda text: _from_text(text, service),
                    what="fault settings",
                    logger=logger,
                    check_interval=check_interval,
                )
            except (OSError, ValueError) as exc:
                from .._exceptions import ConfigError

                raise ConfigError([f"MESH_CONFIG_FILE={path!r}: {exc}"]) from None
            found = self._file.current()
            if found is not None:
                self.faults, self.source = found, path
            self._file.subscribe(self._on_file)
        self._local = (self.faults, self.source)
        if self.faults.active:
            self._announce()

    def _announce(self) -> None:
        key = (self._service, self.source, self.faults)
        if key in _announced:  # once per process (``meshlib serve`` checks before the app)
            return
        _announced.add(key)
        logger.warning(
            "FAULT INJECTION IS ON for %s (from %s): %s; responses are marked %s",
            self._service or "this server",
            self.source,
            self.faults.describe(),
            FAULT_RESPONSE_HEADER,
        )

    def current(self) -> Faults:
        """The settings in force (re-reading the file when it changed)."""
        if self._consul is not None and self._watcher_pid != os.getpid():
            self._follow_consul()
        if self._file is not None:
            self._file.current()  # a new version arrives through _on_file
        return self.faults

    def _on_file(self, found: Faults | None) -> None:
        """A new good version of the config file: its entry, or None for none."""
        assert self._file is not None
        with self._lock:
            self._local = (
                (found, self._file.path) if found is not None else (self._env, "the environment")
            )
            self._apply()

    def _apply(self) -> None:
        """Put the winning settings in force: Consul's KV entry, else the file's or the
        environment's; announce a change."""
        kv = self._kv
        if kv is not None:
            faults, source = kv, f"Consul KV {KV_PREFIX}{self._service}"
        else:
            faults, source = self._local
        if faults == self.faults and source == self.source:
            return
        was_active = self.faults.active
        self.faults, self.source = faults, source
        if faults.active:
            self._announce()
        elif was_active:
            logger.warning("fault injection is off for %s (from %s)", self._service, self.source)

    def _follow_consul(self) -> None:
        """Start the KV watch in this process (again after a fork: threads do not follow)."""
        with self._lock:
            if self._watcher_pid == os.getpid() or self._consul is None or not self._service:
                return
            self._watcher_pid = os.getpid()
            engine = Engine.shared(self._consul)  # keyed by pid: a fork gets its own
            key = quote(KV_PREFIX + self._service, safe="/")
            stop = engine.watch(f"/v1/kv/{key}", self._on_kv, missing_ok=True)
            self._watcher = (engine, stop)

    def _on_kv(self, body: Any, index: int) -> None:
        """A new answer for this service's KV key (on the watch thread)."""
        try:
            kv = None if body is None else _from_kv(body, self._service)
        except ValueError as exc:
            if str(exc) != self._kv_refused:  # one error per distinct problem
                self._kv_refused = str(exc)
                logger.error(
                    "Consul KV %s%s: %s; keeping the last good fault settings",
                    KV_PREFIX,
                    self._service,
                    exc,
                )
            return
        self._kv_refused = ""
        with self._lock:
            self._kv = kv
            self._apply()

    def close(self) -> None:
        """Stop following Consul (the settings in force stay)."""
        watcher, self._watcher, self._consul = self._watcher, None, None
        if watcher is not None:
            engine, stop = watcher
            stop()
            engine.release()

    def decide(self, headers: Mapping[str, str]) -> FaultDecision | None:
        """The fault for a request with these (lower-cased) headers, or None."""
        faults = self.current()
        if not faults.active:
            return None
        header = faults.header
        if header is not None:
            value = headers.get(header.name)
            if value is None or (header.value is not None and value.strip() != header.value):
                return None
        delay = 0.0
        if faults.delay is not None and self._random() < faults.delay_percent:
            delay = faults.delay
        status = None
        if faults.abort_status is not None and self._random() < faults.abort_percent:
            status = faults.abort_status
        if not delay and status is None:
            return None
        return FaultDecision(delay, status)
