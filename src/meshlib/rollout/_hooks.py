"""Rollout hooks: the operator's own gates, as Flagger's webhooks.

* ``pre-rollout``: asked before the first weight moves (a smoke test, a schema check, a
  human's go). Until it passes, nothing is routed to the canary; it is asked again each
  interval, and after ``--threshold`` failures the rollout does not start (nothing to roll
  back: no weight moved).
* ``confirm-promotion``: asked when a check would promote the canary. Until it passes the
  rollout holds its weight and keeps checking the canary's metrics (so a canary that starts
  failing meanwhile is still rolled back); an operator's ``promote`` does not ask it.

A hook is a URL or a command. A URL gets a ``POST`` of the rollout as JSON (Flagger's
payload: ``name``, ``phase``, and the rollout's details) and passes with any 2xx answer. A
command is split as a shell would (``shlex``, without a shell) and run with the rollout in
``MESH_ROLLOUT_*`` environment variables; it passes when it exits 0. Either fails on
``--hook-timeout``. A failure is one line naming the hook and what it said.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Any, Literal

import httpx

from ._state import RolloutState

__all__ = ["Phase", "ask", "ask_all", "payload"]

Phase = Literal["pre-rollout", "confirm-promotion"]

#: How much of a failing hook's answer or output is kept for the message.
_SHOWN = 200


def payload(phase: Phase, state: RolloutState) -> dict[str, Any]:
    """What a URL hook receives (and, as ``MESH_ROLLOUT_*``, a command)."""
    s = state.settings
    return {
        "name": state.service,
        "phase": phase,
        "mode": s.mode,
        "canary": s.canary,
        "stable": s.stable,
        "version": s.canary_version,
        "weight": state.weight,
        "checks_passed": state.step,
    }


def ask(hook: str, phase: Phase, state: RolloutState, timeout: float) -> str | None:
    """Run one hook; None when it passes, else why it did not (one line)."""
    body = payload(phase, state)
    if hook.startswith(("http://", "https://")):
        return _post(hook, body, timeout)
    return _run(hook, body, timeout)


def ask_all(
    hooks: tuple[str, ...], phase: Phase, state: RolloutState, timeout: float
) -> str | None:
    """Run ``hooks`` in order, stopping at the first that fails; None when all pass."""
    for hook in hooks:
        why = ask(hook, phase, state, timeout)
        if why is not None:
            return f"{phase} hook {why}"
    return None


def _post(url: str, body: dict[str, Any], timeout: float) -> str | None:
    try:
        answer = httpx.post(url, json=body, timeout=timeout)
    except httpx.TimeoutException:
        return f"{url} did not answer within {timeout:g}s"
    except httpx.HTTPError as exc:
        return f"{url} failed: {exc}"
    if answer.is_success:
        return None
    text = " ".join(answer.text.split())[:_SHOWN]
    return f"{url} answered {answer.status_code}" + (f": {text}" if text else "")


def _run(command: str, body: dict[str, Any], timeout: float) -> str | None:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        return f"`{command}` cannot be split into arguments: {exc}"
    if not argv:
        return "'' is not a command"
    env = {**os.environ}
    for key, value in body.items():
        env[f"MESH_ROLLOUT_{key.upper()}"] = str(value)
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        return f"`{command}`: command not found"
    except PermissionError:
        return f"`{command}`: not executable"
    except subprocess.TimeoutExpired:
        return f"`{command}` did not finish within {timeout:g}s"
    if done.returncode == 0:
        return None
    said = (done.stderr.strip() or done.stdout.strip()).splitlines()
    last = said[-1][:_SHOWN] if said else ""
    return f"`{command}` exited {done.returncode}" + (f": {last}" if last else "")
