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
canary is rolled back to 0.

A check that would promote first asks the confirm-promotion hooks, if any (``_hooks``):
while they do not pass, the weight holds and the checks go on (``hold_promotion``).

No data is not good data. A check without a measurement that covers its window (no
requests to the canary, a metric source that failed, samples that start after the window
does) is *inconclusive*: it neither passes nor fails, and the rollout holds its weight and
checks again. But a canary is never left on nothing for long: after ``threshold``
inconclusive checks in a row it is rolled back too (Flagger halts on "no values found"
likewise), because a version nobody can see is not a version to keep sending traffic to.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._state import Measurement, Request, RolloutState, Settings

__all__ = ["Routes", "begin", "command", "hold_promotion", "judge", "refusal", "routes"]

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
    history = (*state.history, (now, message))[-_HISTORY:]
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


def _passed(settings: Settings, m: Measurement, success: float) -> tuple[bool, str]:
    shown = f"success {success:.2f}%"
    if m.p99 is not None:
        shown += f", p99 {m.p99 * 1000:.0f}ms"
    shown += f", {m.requests:.0f} requests"
    if success < settings.min_success_rate:
        return False, f"{shown}: success rate below {settings.min_success_rate:g}%"
    if settings.max_p99 is not None and m.p99 is not None and m.p99 > settings.max_p99:
        return False, f"{shown}: p99 above {settings.max_p99 * 1000:.0f}ms"
    return True, shown


def _missing(settings: Settings, m: Measurement) -> str | None:
    """Why ``m`` cannot judge the canary, or None when it can."""
    if m.error is not None:
        return m.error
    if m.requests <= 0:
        return f"no requests to {settings.canary} in the window"
    if m.success_rate is None:
        return f"no success rate for {settings.canary} in the window"
    return None


def judge(state: RolloutState, m: Measurement, now: float) -> RolloutState:
    """The state after one check of a progressing rollout."""
    s = state.settings
    state = state.replace(last=m, next_check=now + s.interval)
    missing = _missing(s, m)
    if missing is not None:
        count = state.inconclusive_checks + 1
        state = state.replace(inconclusive_checks=count, verdict="inconclusive")
        if count >= s.threshold:
            return _note(
                state,
                f"rolled back: {count} inconclusive checks in a row ({missing})",
                now,
                phase="rolled-back",
                weight=0,
                reason="inconclusive checks",
            )
        return _note(
            state,
            f"inconclusive ({count}/{s.threshold}): {missing}; holding at {state.weight}%",
            now,
        )
    assert m.success_rate is not None  # _missing says so
    state = state.replace(inconclusive_checks=0)
    ok, shown = _passed(s, m, m.success_rate)
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
                reason="failed checks",
            )
        return _note(state, f"check failed ({failed}/{s.threshold}): {shown}", now)
    state = state.replace(step=state.step + 1, verdict="passed")
    if s.mode == "canary":
        if state.weight >= s.max_weight:
            return _note(
                state, f"promoted: {shown}", now, phase="promoted", weight=100, reason="promoted"
            )
        weight = min(state.weight + s.step, s.max_weight)
        return _note(state, f"passed: {shown}; weight {weight}%", now, weight=weight)
    if state.step >= s.iterations:
        return _note(
            state,
            f"promoted after {state.step} checks: {shown}",
            now,
            phase="promoted",
            weight=100,
            reason="promoted",
        )
    return _note(state, f"passed {state.step}/{s.iterations}: {shown}", now)


def hold_promotion(
    before: RolloutState, judged: RolloutState, why: str, now: float
) -> RolloutState:
    """``judged`` (a check that promoted ``before``) held back: the confirm-promotion hook
    did not pass. The weight stays; the check counts as passed; the next check asks again."""
    shown = judged.message.partition(": ")[2]
    held = judged.replace(phase="progressing", weight=before.weight, reason="")
    held = held.replace(history=before.history)  # the promotion did not happen
    return _note(held, f"passed: {shown}; promotion waits: {why}", now)


def refusal(state: RolloutState, request: Request) -> str | None:
    """Why an operator's ``request`` would do nothing to ``state`` (None: it would act)."""
    where = f"the rollout of {state.service!r}"
    if state.phase not in ("progressing", "paused"):
        return f"{where} is already {state.phase}: nothing to {request}"
    if request == "resume" and state.phase != "paused":
        return f"{where} is not paused (progressing at {state.weight}%): nothing to resume"
    if request == "pause" and state.phase == "paused":
        return f"{where} is already paused at {state.weight}%: nothing to pause"
    return None


def command(state: RolloutState, request: Request, now: float) -> RolloutState:
    """The state after an operator's ``promote``, ``abort``, ``pause`` or ``resume``.

    A request that would do nothing (``refusal``) only clears the request: no event.
    """
    state = state.replace(request=None)
    if refusal(state, request) is not None:
        return state
    if request == "promote":
        return _note(
            state, "promoted by the operator", now, phase="promoted", weight=100, reason="operator"
        )
    if request == "abort":
        return _note(
            state, "aborted by the operator", now, phase="aborted", weight=0, reason="operator"
        )
    if request == "pause":
        return _note(state, f"paused at {state.weight}%", now, phase="paused")
    return _note(
        state,
        f"resumed at {state.weight}%",
        now,
        phase="progressing",
        next_check=now + state.settings.interval,
    )
