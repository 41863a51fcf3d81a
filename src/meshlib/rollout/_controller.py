"""The rollout's decisions, without I/O: state in, measurement in, state out.

Observe -> judge -> adjust, one check per interval (Flagger's analysis, in the same words):

* **canary**: start at ``step`` percent; each passing check adds ``step`` up to
  ``max_weight``; a passing check at ``max_weight`` promotes (100 percent to the canary).
* **blue-green**: the canary gets no share of the split while ``iterations`` checks run
  against the traffic it does get (test traffic, a header pin, a smoke test); then all of
  it at once.
* **ab**: like blue-green, with a header or cookie match routing the chosen users to the
  canary meanwhile.

A check fails when the success rate is below ``min_success_rate`` or the p99 latency is
above ``max_p99``; after ``threshold`` failed checks (in total, as Flagger counts them) the
canary is rolled back to 0. A window without a single request to the canary is
*inconclusive*: it neither passes nor fails, the rollout holds its weight and checks again,
because promoting on no evidence is as wrong as rolling back a healthy version at night.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._state import Measurement, Request, RolloutState, Settings

__all__ = ["Routes", "begin", "command", "judge", "routes"]

_HISTORY = 20


@dataclass(frozen=True)
class Routes:
    """What the routing entries should say for a state."""

    weight: int
    #: the header/cookie route to the canary is in the service-router
    route: bool


def routes(state: RolloutState) -> Routes:
    """The routing that ``state`` calls for (applied after every change, and on resume)."""
    if state.phase == "promoted":
        return Routes(100, False)
    if state.phase in ("rolled-back", "aborted"):
        return Routes(0, False)
    return Routes(state.weight, state.settings.match is not None)


def _note(state: RolloutState, message: str, now: float, **changes: object) -> RolloutState:
    history = (*state.history, message)[-_HISTORY:]
    return state.replace(message=message, updated=now, history=history, **changes)


def begin(service: str, settings: Settings, now: float) -> RolloutState:
    """A new rollout of ``settings.canary`` for ``service``."""
    weight = min(settings.step, settings.max_weight) if settings.mode == "canary" else 0
    state = RolloutState(service=service, settings=settings, started=now)
    how = (
        f"{weight}% of {service} to {settings.canary}"
        if settings.mode == "canary"
        else f"{settings.canary} checked at 0% of the split"
        + (f", {settings.match} routed to it" if settings.match else "")
    )
    return _note(
        state,
        f"started ({settings.mode}): {how}",
        now,
        weight=weight,
        next_check=now + settings.interval,
    )


def _passed(settings: Settings, m: Measurement) -> tuple[bool, str]:
    success = m.success_rate if m.success_rate is not None else 100.0
    shown = f"success {success:.2f}%"
    if m.p99 is not None:
        shown += f", p99 {m.p99 * 1000:.0f}ms"
    shown += f", {m.requests:.0f} requests"
    if success < settings.min_success_rate:
        return False, f"{shown}: success rate below {settings.min_success_rate:g}%"
    if settings.max_p99 is not None and m.p99 is not None and m.p99 > settings.max_p99:
        return False, f"{shown}: p99 above {settings.max_p99 * 1000:.0f}ms"
    return True, shown


def judge(state: RolloutState, m: Measurement, now: float) -> RolloutState:
    """The state after one check of a progressing rollout."""
    s = state.settings
    state = state.replace(last=m, next_check=now + s.interval)
    if m.error is not None:
        return _note(
            state,
            f"inconclusive: {m.error}; holding at {state.weight}%",
            now,
            verdict="inconclusive",
        )
    if m.requests <= 0:
        return _note(
            state,
            f"inconclusive: no requests to {s.canary} in the window; holding at {state.weight}%",
            now,
            verdict="inconclusive",
        )
    ok, shown = _passed(s, m)
    if not ok:
        failed = state.failed_checks + 1
        state = state.replace(failed_checks=failed, verdict="failed")
        if failed >= s.threshold:
            return _note(
                state,
                f"rolled back: {shown} ({failed}/{s.threshold} failed checks)",
                now,
                phase="rolled-back",
                weight=0,
            )
        return _note(state, f"check failed ({failed}/{s.threshold}): {shown}", now)
    state = state.replace(step=state.step + 1, verdict="passed")
    if s.mode == "canary":
        if state.weight >= s.max_weight:
            return _note(state, f"promoted: {shown}", now, phase="promoted", weight=100)
        weight = min(state.weight + s.step, s.max_weight)
        return _note(state, f"passed: {shown}; weight {weight}%", now, weight=weight)
    if state.step >= s.iterations:
        return _note(
            state, f"promoted after {state.step} checks: {shown}", now, phase="promoted", weight=100
        )
    return _note(state, f"passed {state.step}/{s.iterations}: {shown}", now)


def command(state: RolloutState, request: Request, now: float) -> RolloutState:
    """The state after an operator's ``promote``, ``abort``, ``pause`` or ``resume``."""
    state = state.replace(request=None)
    if state.phase not in ("progressing", "paused"):
        return _note(state, f"{request} ignored: the rollout is already {state.phase}", now)
    if request == "promote":
        return _note(state, "promoted by the operator", now, phase="promoted", weight=100)
    if request == "abort":
        return _note(state, "aborted by the operator", now, phase="aborted", weight=0)
    if request == "pause":
        return _note(state, f"paused at {state.weight}%", now, phase="paused")
    return _note(
        state,
        f"resumed at {state.weight}%",
        now,
        phase="progressing",
        next_check=now + state.settings.interval,
    )
