"""The Consul HTTP API as the rollout controller uses it: one JSON call, errors in one line.

The errors of ``meshlib rollout``, each message one line for the operator::

    RolloutError                 the rollout cannot go on (bad resolver, lock held, ...)
     +-- ConsulUnavailable       Consul did not answer, or answered 5xx: worth retrying
     +-- MetricsUnavailable      the metric source failed: the check is inconclusive

The controller is a small synchronous control loop, so a plain ``httpx.Client`` serves it
better than py-consul: py-consul has no CAS for config entries and no blocking query on a
single KV key with a sub-second ``wait`` (FINDINGS.md), both of which the controller needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from .._config import ConsulSettings
from ..consul import client_options, request_extensions

__all__ = ["ConsulAPI", "ConsulUnavailable", "MetricsUnavailable", "RolloutError"]


class RolloutError(Exception):
    """A rollout cannot go on; the message is one line meant for the operator."""


class ConsulUnavailable(RolloutError):
    """Consul could not be reached or failed (5xx); a controller retries for a while."""


class MetricsUnavailable(RolloutError):
    """The metric source could not measure; the check is inconclusive, not failed."""


class ConsulAPI:
    """JSON calls to one Consul agent; every failure becomes a one-line ``RolloutError``."""

    def __init__(self, settings: ConsulSettings, *, timeout: float = 10.0) -> None:
        self.address = settings.address
        self._extensions = request_extensions(settings)
        # a blocking query waits up to its `wait` plus Consul's jitter (wait / 16)
        self._client = httpx.Client(
            **client_options(settings, timeout=httpx.Timeout(timeout, read=None))
        )
        self._timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content: bytes | None = None,
        missing_ok: bool = False,
        wait: float = 0.0,
    ) -> tuple[Any, int]:
        """``(decoded JSON or None, X-Consul-Index)``; ``None`` for a 404 if ``missing_ok``."""
        try:
            response = self._client.request(
                method,
                path,
                params=params,
                json=body,
                content=content,
                extensions=self._extensions,
                timeout=httpx.Timeout(self._timeout, read=self._timeout + wait * 1.1),
            )
        except httpx.HTTPError as exc:
            raise ConsulUnavailable(
                f"cannot reach Consul at {self.address} ({type(exc).__name__}: {exc})"
            ) from exc
        index = int(response.headers.get("X-Consul-Index", "0") or 0)
        if response.status_code == 404 and missing_ok:
            return None, index
        if response.status_code >= 400:
            text = " ".join(response.text.split()) or response.reason_phrase
            error = ConsulUnavailable if response.status_code >= 500 else RolloutError
            raise error(f"Consul refused {method} {path}: {text}")
        if not response.content:
            return None, index
        try:
            return response.json(), index
        except ValueError:
            return response.text, index

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()
