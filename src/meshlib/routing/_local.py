"""The local config file: the embedded default's control plane (``MESH_CONFIG_FILE``).

A JSON document::

    {
      "services": {
        "forecast": [
          {"address": "127.0.0.1:8001", "meta": {"version": "v1"}, "weight": 1},
          {"address": "127.0.0.1:8003", "meta": {"version": "v2"}, "tags": ["canary"]}
        ]
      },
      "config_entries": [
        {"Kind": "service-resolver", "Name": "forecast", "DefaultSubset": "v1",
         "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                     "v2": {"Filter": "Service.Meta.version == v2"}}},
        {"Kind": "service-splitter", "Name": "forecast",
         "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]}
      ]
    }

``config_entries`` are exactly what one would write to Consul. The file is checked when it
is first read (a bad file stops start-up with one line) and then whenever its modification
time changes, at most every ``check_interval`` seconds, on the caller's thread (a ``stat``;
the file is only read when it changed). A version that does not parse or compile is refused
with one logged error and the last good one stays in force: a typo during a rollout must not
take routing down.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .._config import _host_port
from ..discovery._endpoint import Endpoint
from ._chain import Chain
from ._entries import compile_entries

__all__ = ["LocalConfig", "LocalConfigFile"]

logger = logging.getLogger("meshlib.routing")


@dataclass(frozen=True)
class LocalConfig:
    """One good version of the file."""

    services: Mapping[str, tuple[Endpoint, ...]]
    chains: Mapping[str, Chain]


def parse(text: str) -> LocalConfig:
    """Parse and compile the file's text; ``ValueError`` naming the problem."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError("the top level must be an object")
    # "faults" belongs to the server's fault injection (server/_faults.py reads it)
    unknown = set(document) - {"services", "config_entries", "faults"}
    if unknown:
        raise ValueError(f"unknown top-level keys {sorted(unknown)}")
    services: dict[str, tuple[Endpoint, ...]] = {}
    listed = document.get("services") or {}
    if not isinstance(listed, dict):
        raise ValueError("services must be an object of service names")
    for name, instances in listed.items():
        if not isinstance(instances, list):
            raise ValueError(f"services.{name} must be a list of instances")
        services[name] = tuple(_endpoint(name, i, item) for i, item in enumerate(instances))
    entries = document.get("config_entries") or []
    if not isinstance(entries, list):
        raise ValueError("config_entries must be a list")
    return LocalConfig(MappingProxyType(services), MappingProxyType(compile_entries(entries)))


def _endpoint(service: str, index: int, item: Any) -> Endpoint:
    where = f"services.{service}[{index}]"
    if not isinstance(item, dict) or "address" not in item:
        raise ValueError(f"{where} must be an object with an address")
    try:
        host, port = _host_port(str(item["address"]))
    except ValueError as exc:
        raise ValueError(f"{where}.address: {exc}") from None
    meta = item.get("meta") or {}
    tags = item.get("tags") or []
    weight = item.get("weight", 1)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{where}.meta must map names to strings")
    if not isinstance(tags, list) or not isinstance(weight, int) or weight < 1:
        raise ValueError(f"{where}: tags must be a list and weight a whole number >= 1")
    endpoint = Endpoint(host, port, weight, meta=MappingProxyType(dict(meta)), tags=tuple(tags))
    return Endpoint(
        host,
        port,
        weight,
        id=str(item.get("id") or endpoint.address),
        meta=endpoint.meta,
        tags=endpoint.tags,
    )


class LocalConfigFile:
    """The file, re-read when it changes; ``current`` never raises after the first read."""

    def __init__(self, path: str, *, check_interval: float = 0.5) -> None:
        self.path = path
        self.check_interval = check_interval
        self._listeners: list[Callable[[LocalConfig], None]] = []
        self._lock = threading.Lock()
        self._mtime = os.stat(path).st_mtime_ns
        with open(path, encoding="utf-8") as fh:
            self._config = parse(fh.read())  # a bad file stops start-up
        self._checked = time.monotonic()

    def subscribe(self, listener: Callable[[LocalConfig], None]) -> None:
        """Call ``listener`` with every new good version."""
        self._listeners.append(listener)

    def current(self) -> LocalConfig:
        """The latest good version (checking the file at most every ``check_interval``)."""
        now = time.monotonic()
        if now - self._checked >= self.check_interval and self._lock.acquire(blocking=False):
            try:
                self._checked = now
                self._reload_if_changed()
            finally:
                self._lock.release()
        return self._config

    def _reload_if_changed(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError as exc:
            if self._mtime != -1:
                logger.error("%s: %s; keeping the last good configuration", self.path, exc)
                self._mtime = -1
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            with open(self.path, encoding="utf-8") as fh:
                config = parse(fh.read())
        except (OSError, ValueError) as exc:
            logger.error("%s is refused (%s); keeping the last good configuration", self.path, exc)
            return
        self._config = config
        logger.info("%s reloaded", self.path)
        for listener in self._listeners:
            try:
                listener(config)
            except Exception:
                logger.exception("a local config listener failed")
