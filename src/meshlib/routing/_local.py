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
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .._config import _host_port
from .._endpoint import Endpoint
from .._watched_file import WatchedFile
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


class LocalConfigFile(WatchedFile[LocalConfig]):
    """The file, re-read when it changes; ``current`` never raises after the first read."""

    def __init__(self, path: str, *, check_interval: float = 0.5) -> None:
        # a bad file stops start-up: the OSError / ValueError goes to the caller
        super().__init__(
            path, parse, what="configuration", logger=logger, check_interval=check_interval
        )
        self.subscribe(lambda _: logger.info("%s reloaded", path))
