"""A rollout's state: the record, and where it lives (Consul KV, ``meshlib/rollouts/<service>``).

The whole state is one JSON document under ``meshlib/rollouts/<service>/state``, written
with check-and-set on its ``ModifyIndex``: a controller that restarts reads it back and
carries on at the same step, and a write based on a stale read (a second writer, or an
operator's ``pause`` landing meanwhile) fails instead of undoing the other change.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from ._consul import ConsulAPI
from ._consul_entries import Match

__all__ = [
    "ACTIVE",
    "Measurement",
    "Mode",
    "Phase",
    "Request",
    "RolloutState",
    "Settings",
    "StateStore",
    "key_prefix",
]

Mode = Literal["canary", "blue-green", "ab"]
Phase = Literal["progressing", "paused", "promoted", "rolled-back", "aborted"]
Request = Literal["promote", "abort", "pause", "resume"]
#: Phases a controller still drives; the others are final.
ACTIVE: frozenset[str] = frozenset({"progressing", "paused"})


def key_prefix(service: str) -> str:
    """The KV folder of one service's rollout."""
    return f"meshlib/rollouts/{quote(service, safe='')}"


@dataclass(frozen=True)
class Settings:
    """How a rollout proceeds; fixed when it starts, kept in its state."""

    mode: Mode
    canary: str
    stable: str
    canary_version: str
    step: int = 10
    max_weight: int = 100
    interval: float = 30.0
    window: float = 30.0
    iterations: int = 5
    min_success_rate: float = 99.0
    max_p99: float | None = 0.5
    #: failed checks in total, and inconclusive checks in a row, before rolling back
    threshold: int = 2
    match: Match | None = None
    #: seconds between Prometheus's scrapes of the canary's and stable's targets (0: unknown,
    #: a metric source that has no scrapes)
    scrape_interval: float = 0.0
    #: hooks asked before the first weight moves, and before a check promotes (``_hooks``)
    pre_rollout: tuple[str, ...] = ()
    confirm_promotion: tuple[str, ...] = ()
    hook_timeout: float = 30.0

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Measurement:
    """The canary's metrics over one window.

    Only a measurement with ``requests > 0``, a ``success_rate`` and no ``error`` can pass
    or fail a check; anything less is inconclusive (no data is not good data).
    """

    requests: float
    success_rate: float | None = None  # percent
    p99: float | None = None  # seconds
    #: why nothing (or not enough) could be measured: the source failed, or its data does
    #: not cover the window
    error: str | None = None
    #: the span the counts cover, as the source's sample times (seconds since the epoch)
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class RolloutState:
    """Where one service's rollout is; the controller's whole memory."""

    service: str
    settings: Settings
    phase: Phase = "progressing"
    weight: int = 0
    #: checks passed so far (canary: steps taken; blue/green, A/B: iterations passed)
    step: int = 0
    failed_checks: int = 0
    #: inconclusive checks in a row (a check that passes or fails resets it)
    inconclusive_checks: int = 0
    last: Measurement | None = None
    verdict: str = ""
    message: str = ""
    started: float = 0.0
    updated: float = 0.0
    next_check: float = 0.0
    #: an operator's command waiting for the controller
    request: Request | None = None
    #: why the rollout ended: "promoted", "failed checks", "inconclusive checks", "operator"
    reason: str = ""
    #: the latest events, ``(time, message)``
    history: tuple[tuple[float, str], ...] = field(default=())

    def replace(self, **changes: Any) -> RolloutState:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The JSON document kept in KV (and printed by ``status --json``)."""
        data = dataclasses.asdict(self)
        data["history"] = [list(entry) for entry in self.history]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        """Read back what ``to_json`` wrote."""
        raw = dict(data["settings"])
        match = raw.pop("match", None)
        for hooks in ("pre_rollout", "confirm_promotion"):
            raw[hooks] = tuple(raw.get(hooks) or ())
        settings = Settings(**raw, match=Match(**match) if match else None)
        last = data.get("last")
        fields = {k: v for k, v in data.items() if k not in ("settings", "last", "history")}
        return cls(
            **fields,
            settings=settings,
            last=Measurement(**last) if last else None,
            history=tuple(
                (0.0, entry) if isinstance(entry, str) else (float(entry[0]), str(entry[1]))
                for entry in data.get("history") or ()
            ),
        )


class StateStore:
    """One service's rollout state in Consul KV, read and written with check-and-set."""

    def __init__(self, api: ConsulAPI, service: str) -> None:
        self.api = api
        self.key = f"/v1/kv/{key_prefix(service)}/state"

    def load(self) -> tuple[RolloutState | None, int]:
        """``(state or None, ModifyIndex)``; index 0 when there is none yet."""
        return self._read({})

    def wait(self, index: int, timeout: float) -> tuple[RolloutState | None, int]:
        """Like ``load``, but returns early only when the state changes after ``index``."""
        params = {"index": str(index), "wait": f"{max(timeout, 0.001) * 1000:.0f}ms"}
        return self._read(params, wait=timeout)

    def save(self, state: RolloutState, cas: int) -> bool:
        """Write ``state`` if the key is still at ``cas`` (0: does not exist yet)."""
        content = json.dumps(state.to_json()).encode()
        ok, _ = self.api.call("PUT", self.key, params={"cas": str(cas)}, content=content)
        return ok is True

    def delete(self) -> None:
        """Forget the rollout (tests and cleanup)."""
        self.api.call("DELETE", self.key)

    def _read(self, params: dict[str, str], wait: float = 0.0) -> tuple[RolloutState | None, int]:
        body, _ = self.api.call("GET", self.key, params=params, missing_ok=True, wait=wait)
        if not body:
            return None, 0
        entry = body[0]
        value = json.loads(base64.b64decode(entry["Value"]))
        return RolloutState.from_json(value), int(entry["ModifyIndex"])
