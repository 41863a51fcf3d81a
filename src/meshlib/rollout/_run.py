"""The rollout commands: the controller loop (``start``) and the operator's commands.

The loop reads the state (Consul KV, or a file beside the local config file: a
``ControlPlane``, ``_plane``), acts (an operator's request first, then a check when one
is due), writes the new state with check-and-set, then makes the routing entries say what
the state says. Between checks it waits on a blocking query of the state key, so a
``pause`` or ``abort`` typed in another terminal is acted on at once. Routing is
re-applied from the state on every start, so a controller killed between writing the state
and the splitter leaves nothing half done.

State only after the write: each change writes the routing first and the state after it,
so a write Consul refuses (a splitter for a service without ``Protocol = "http"``) or that
fails leaves the state as it was, and ``status`` never shows a weight no splitter carries.

Before the first weight moves, ``start`` asks the metric source (Prometheus) whether it
scrapes the canary's and the stable version's instances and how often, and refuses an
interval or window shorter than four scrapes (``MIN_SCRAPES``): fewer samples than that
measure the scrape timing more than the canary.

Hooks (``_hooks``): a new rollout asks its pre-rollout hooks before the first weight
moves; a check that would promote asks the confirm-promotion hooks first.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TextIO

from ._consul import ConsulAPI, ConsulUnavailable, MetricsUnavailable, RolloutError
from ._consul_entries import Match, Resolver
from ._controller import begin, command, hold_promotion, judge, refusal, routes
from ._hooks import ask_all
from ._metrics import MetricSource, ScrapedSource, format_seconds
from ._plane import ConsulPlane, ControlPlane, Lock, Store
from ._state import ACTIVE, Measurement, Mode, Request, RolloutState, Settings
from ._view import View, event_json

__all__ = [
    "MIN_SCRAPES",
    "Options",
    "apply_routes",
    "exit_status",
    "run_command",
    "start",
    "status",
]

#: How long a command waits for a running controller to take it.
COMMAND_TIMEOUT = 30.0
#: How long a controller rides out an unreachable Consul before it gives up.
CONSUL_OUTAGE = 60.0
#: A check's window (and the interval between checks) spans at least this many scrapes.
MIN_SCRAPES = 4
#: The event each operator command produces.
_EVENT = {"promote": "promoted", "abort": "aborted", "pause": "paused", "resume": "resumed"}


@dataclass(frozen=True)
class Options:
    """``meshlib rollout start``'s flags."""

    canary: str
    mode: Mode = "canary"
    stable: str | None = None
    step: int = 10
    max_weight: int = 100
    interval: float = 30.0
    window: float | None = None
    iterations: int = 10
    min_success_rate: float = 99.0
    max_p99: float | None = 0.5
    threshold: int = 2
    match: Match | None = None
    pre_rollout: tuple[str, ...] = ()
    confirm_promotion: tuple[str, ...] = ()
    hook_timeout: float = 30.0


def _plane(plane: ControlPlane | ConsulAPI) -> ControlPlane:
    """A ``ConsulAPI`` is taken as Consul's control plane (the callers before planes)."""
    return ConsulPlane(plane) if isinstance(plane, ConsulAPI) else plane


def _settings(plane: ControlPlane, service: str, options: Options, resolver: Resolver) -> Settings:
    subsets = sorted(resolver.subsets)
    known = ", ".join(subsets) or "none"
    if options.canary not in resolver.subsets:
        raise RolloutError(
            f"service-resolver {service!r} has no subset {options.canary!r} (subsets: {known})"
        )
    split = plane.split(service) or {}
    if split.get(options.canary, 0) >= 100:
        raise RolloutError(
            f"{options.canary!r} already gets 100% of {service!r}: nothing to roll out"
        )
    stable = options.stable
    if stable is None:
        candidates = [(w, s) for s, w in split.items() if s in subsets and s != options.canary]
        stable = max(candidates)[1] if candidates and max(candidates)[0] > 0 else None
        stable = stable or resolver.default or None
    if stable is None:
        raise RolloutError(
            f"service-resolver {service!r} has no DefaultSubset: name the stable one with --stable"
        )
    if stable not in resolver.subsets:
        raise RolloutError(
            f"service-resolver {service!r} has no subset {stable!r} (subsets: {known})"
        )
    if stable == options.canary:
        raise RolloutError(
            f"{options.canary!r} is already the stable subset of {service!r}: nothing to roll out"
        )
    if options.mode == "ab" and options.match is None:
        raise RolloutError("--mode ab needs --header name=value or --cookie name=value")
    return Settings(
        mode=options.mode,
        canary=options.canary,
        stable=stable,
        canary_version=resolver.version(options.canary),
        step=options.step,
        max_weight=options.max_weight,
        interval=options.interval,
        window=options.window or options.interval,
        iterations=options.iterations,
        min_success_rate=options.min_success_rate,
        max_p99=options.max_p99,
        threshold=options.threshold,
        match=options.match,
        pre_rollout=options.pre_rollout,
        confirm_promotion=options.confirm_promotion,
        hook_timeout=options.hook_timeout,
    )


def apply_routes(plane: ControlPlane, state: RolloutState) -> None:
    """Make the splitter (and router) say what ``state`` calls for."""
    s = state.settings
    wanted = routes(state)
    try:
        plane.write_split(state.service, s.stable, s.canary, wanted.weight)
    except RolloutError as exc:
        if "protocol" in str(exc):
            raise RolloutError(
                f'{exc} (splitting needs Protocol = "http" in a service-defaults entry for '
                f"{state.service!r})"
            ) from None
        raise
    if s.match is not None:
        if wanted.route:
            plane.write_route(state.service, s.canary, s.match)
        else:
            plane.remove_route(state.service, s.match)


class _Stopped(Exception):
    pass


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def exit_status(state: RolloutState) -> int:
    """``start``'s exit status: 0 promoted, 3 rolled back on inconclusive checks, else 1."""
    if state.phase == "promoted":
        return 0
    return 3 if state.reason == "inconclusive checks" else 1


def _preflight(
    plane: ControlPlane, source: MetricSource, resolver: Resolver, settings: Settings
) -> Settings:
    """Check the source sees both versions, and that the checks span four scrapes."""
    if not isinstance(source, ScrapedSource):
        return settings
    versions = {
        resolver.version(subset): plane.instances(resolver, subset)
        for subset in (settings.stable, settings.canary)
    }
    try:
        scrape = source.scrape_interval(resolver.service, versions)
    except MetricsUnavailable as exc:
        raise RolloutError(f"{exc}; no weight was moved") from None
    least = MIN_SCRAPES * scrape
    if not scrape:  # scraped on demand, at each check: no interval to span
        return settings
    for flag, value in (("--interval", settings.interval), ("--window", settings.window)):
        if value < least - 1e-9:
            raise RolloutError(
                f"{flag} {format_seconds(value)} is shorter than {MIN_SCRAPES} scrapes of "
                f"{resolver.service} (Prometheus scrapes it every {format_seconds(scrape)}): "
                f"use {flag} {format_seconds(least)} or more, or scrape it more often"
            )
    return settings.replace(scrape_interval=scrape)


def _commit(plane: ControlPlane, store: Store, new: RolloutState, index: int) -> bool:
    """Routing first, then the state (check-and-set); False when the state changed meanwhile.

    Nothing is saved if a routing write fails. If the state changed meanwhile, the routing
    goes back to what the stored state says, and the caller reads it again.
    """
    apply_routes(plane, new)
    if store.save(new, index):
        return True
    current, _ = store.load()
    if current is not None:
        apply_routes(plane, current)
    return False


def start(
    plane: ControlPlane | ConsulAPI,
    source: MetricSource,
    service: str,
    options: Options,
    view: View,
    *,
    err: TextIO = sys.stderr,
    clock: Callable[[], float] = time.time,
) -> int:
    """Run (or resume) the rollout of ``service``; its exit status (``exit_status``)."""
    plane = _plane(plane)
    resolver = plane.resolver(service)
    store = plane.store(service)
    lock = plane.lock(service)
    holder = lock.acquire()
    if holder is not None:
        raise RolloutError(
            f"another controller is driving {service!r} ({holder.describe()}); "
            "use `meshlib rollout status|pause|abort` or stop that controller first"
        )
    previous = signal.signal(signal.SIGTERM, _stop)
    state: RolloutState | None = None
    try:
        state, index = store.load()
        if state is not None and state.phase in ACTIVE:
            if state.settings.canary != options.canary:
                raise RolloutError(
                    f"a rollout of {service!r} to {state.settings.canary!r} is in progress: "
                    f"abort it before starting one to {options.canary!r}"
                )
            kind = "resumed"
            settings = _preflight(plane, source, resolver, state.settings)
            state = state.replace(
                settings=settings,
                message=f"resumed at step {state.step}, weight {state.weight}%",
                updated=clock(),
            )
        else:
            kind = "started"
            settings = _settings(plane, service, options, resolver)
            settings = _preflight(plane, source, resolver, settings)
            _pre_rollout(begin(service, settings, clock()).replace(weight=0), err)
            state = begin(service, settings, clock())
        if not _commit(plane, store, state, index):
            raise RolloutError(f"the rollout state of {service!r} changed while starting")
        view.event(kind, state)
        state = _drive(plane, source, store, lock, view, clock, err)
        return exit_status(state)
    except (KeyboardInterrupt, _Stopped):
        current, _ = store.load()
        if current is not None and current.phase in ACTIVE:
            err.write(
                f"meshlib rollout: controller stopped; {service} stays {current.phase} at "
                f"{current.weight}%. Run the same `meshlib rollout start` to resume it.\n"
            )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        view.close()
        lock.release()


def _pre_rollout(state: RolloutState, err: TextIO) -> None:
    """Ask the pre-rollout hooks until they pass; after ``threshold`` failures, refuse."""
    s = state.settings
    if not s.pre_rollout:
        return
    for attempt in range(1, s.threshold + 1):
        why = ask_all(s.pre_rollout, "pre-rollout", state, s.hook_timeout)
        if why is None:
            return
        if attempt == s.threshold:
            raise RolloutError(
                f"{why} ({attempt}/{s.threshold}): the rollout did not start, no weight was moved"
            )
        err.write(
            f"meshlib rollout: {why} ({attempt}/{s.threshold}); "
            f"asking again in {format_seconds(s.interval)}\n"
        )
        err.flush()
        time.sleep(s.interval)  # the interval between asks, as between checks


def _drive(
    plane: ControlPlane,
    source: MetricSource,
    store: Store,
    lock: Lock,
    view: View,
    clock: Callable[[], float],
    err: TextIO,
) -> RolloutState:
    failing_since: float | None = None
    while True:
        try:
            final = _tick(plane, source, store, lock, view, clock)
        except ConsulUnavailable as exc:
            # Ride out a short Consul outage; the routing entries keep their last weights.
            now = time.monotonic()
            if failing_since is None:
                failing_since = now
                err.write(f"meshlib rollout: {exc}; retrying for {CONSUL_OUTAGE:g}s\n")
            if now - failing_since > CONSUL_OUTAGE:
                raise
            time.sleep(1.0)  # the retry period while Consul is unreachable
            continue
        failing_since = None
        if final is not None:
            return final


def _tick(
    plane: ControlPlane,
    source: MetricSource,
    store: Store,
    lock: Lock,
    view: View,
    clock: Callable[[], float],
) -> RolloutState | None:
    """One step of the loop; the final state once the rollout has ended."""
    if lock.lost.is_set():
        raise RolloutError("lost the controller lock (Consul ended its session); stopping")
    state, index = store.load()
    if state is None:
        raise RolloutError(f"the rollout state was deleted from {plane.where}; stopping")
    if state.request is not None:
        new = command(state, state.request, clock())
        if _commit(plane, store, new, index) and new.message != state.message:
            view.event(_EVENT[state.request], new)
        return None
    if state.phase not in ACTIVE:
        return state
    now = clock()
    if state.phase == "paused":
        store.wait(index, 30.0)
        return None
    if now < state.next_check:
        store.wait(index, state.next_check - now)
        return None
    s = state.settings
    try:
        measured = source.measure(state.service, s.canary_version, s.window)
    except MetricsUnavailable as exc:
        measured = Measurement(requests=0.0, error=str(exc))
    new = judge(state, measured, clock())
    if new.phase == "promoted" and s.confirm_promotion:
        why = ask_all(s.confirm_promotion, "confirm-promotion", state, s.hook_timeout)
        if why is not None:
            new = hold_promotion(state, new, why, clock())
    if _commit(plane, store, new, index):  # else: changed meanwhile; read it again, decide anew
        view.event("check" if new.phase in ACTIVE else new.phase, new)
    return None


def run_command(
    plane: ControlPlane | ConsulAPI,
    service: str,
    request: Request,
    view: View,
    *,
    err: TextIO = sys.stderr,
    clock: Callable[[], float] = time.time,
    timeout: float = COMMAND_TIMEOUT,
) -> int:
    """``promote``, ``abort``, ``pause`` or ``resume`` the rollout of ``service``."""
    plane = _plane(plane)
    store = plane.store(service)
    state, index = store.load()
    if state is None:
        raise RolloutError(f"no rollout of {service!r} in {plane.where}: nothing to {request}")
    refused = refusal(state, request)
    if refused is not None:
        raise RolloutError(refused)
    lock = plane.lock(service)
    holder = lock.acquire()
    if holder is None:  # no controller running: carry the command out here
        try:
            state, index = store.load()
            assert state is not None
            refused = refusal(state, request)
            if refused is not None:
                raise RolloutError(refused)
            new = command(state, request, clock())
            if not _commit(plane, store, new, index):
                raise RolloutError(f"the rollout state of {service!r} changed meanwhile; retry")
            view.event(_EVENT[request], new)
        finally:
            lock.release()
        if request == "resume":
            err.write(
                f"meshlib rollout: no controller is running for {service}; run "
                f"`meshlib rollout start {service} --canary {new.settings.canary}` to drive it\n"
            )
        return 0
    # A controller holds the lock: leave the request in the state for it to act on.
    deadline = clock() + timeout
    while state is not None and not store.save(state.replace(request=request), index):
        state, index = store.load()
        if clock() > deadline:
            raise RolloutError(f"the rollout state of {service!r} keeps changing; retry")
    while clock() < deadline:
        state, index = store.wait(index, max(deadline - clock(), 0.001))
        if state is None or state.request is None:
            break
    else:
        raise RolloutError(
            f"the controller ({holder.describe()}) did not act on {request} within "
            f"{timeout:g}s; it stays queued"
        )
    if state is not None:
        view.event(_EVENT[request], state)
    return 0


def status(
    plane: ControlPlane | ConsulAPI, service: str, *, json_lines: bool, out: TextIO = sys.stdout
) -> int:
    """Print where the rollout of ``service`` is, and who drives it."""
    plane = _plane(plane)
    state, _ = plane.store(service).load()
    if state is None:
        raise RolloutError(f"no rollout of {service!r} in {plane.where}")
    holder = plane.lock(service).holder()
    controller = holder.describe() if holder is not None else None
    if json_lines:
        out.write(json.dumps({**event_json("status", state), "controller": controller}) + "\n")
        return 0
    s = state.settings
    m = state.last
    lines = [
        f"service:    {service}",
        f"mode:       {s.mode} ({s.stable} -> {s.canary}, version {s.canary_version})",
        f"phase:      {state.phase}",
        f"weight:     {state.weight}%",
        f"checks:     {state.step} passed, {state.failed_checks}/{s.threshold} failed, "
        f"{state.inconclusive_checks}/{s.threshold} inconclusive in a row",
    ]
    if s.scrape_interval:
        lines.append(f"scrapes:    every {format_seconds(s.scrape_interval)}")
    if m is not None and m.error is not None:
        lines.append(f"metrics:    {m.error}")
    elif m is not None:
        lines.append(
            f"metrics:    {m.requests:.0f} requests, success "
            + ("-" if m.success_rate is None else f"{m.success_rate:.2f}%")
            + ", p99 "
            + ("-" if m.p99 is None else f"{m.p99 * 1000:.0f}ms")
        )
    if s.match is not None:
        lines.append(f"match:      {s.match}")
    lines.append(f"controller: {controller or 'none running'}")
    lines.append(f"last:       {state.message}")
    out.write("\n".join(lines) + "\n")
    return 0
