"""How a rollout shows itself: a live panel on a terminal, one line per event otherwise.

* a terminal gets a ``rich`` live panel: the phase, a weight bar, the checks passed and
  failed, the canary's last metrics, and the latest events;
* a pipe or a file gets one plain line per event (no cursor movement, no colours);
* ``--json`` gets one JSON object per event and line, for machines.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol, TextIO

from ._state import RolloutState

__all__ = ["JsonView", "PlainView", "RichView", "View", "event_json", "make_view"]


class View(Protocol):
    """Receives every event of a rollout."""

    def event(self, kind: str, state: RolloutState) -> None:
        """``kind``: started, resumed, check, promoted, rolled-back, aborted, paused, ..."""
        ...

    def close(self) -> None:
        """The rollout (or this controller) ended."""
        ...


def event_json(kind: str, state: RolloutState) -> dict[str, Any]:
    """One event as the JSON object ``--json`` prints."""
    s = state.settings
    m = state.last
    return {
        "event": kind,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.updated or time.time())),
        "service": state.service,
        "mode": s.mode,
        "canary": s.canary,
        "stable": s.stable,
        "phase": state.phase,
        "weight": state.weight,
        "step": state.step,
        "failed_checks": state.failed_checks,
        "inconclusive_checks": state.inconclusive_checks,
        "threshold": s.threshold,
        "verdict": state.verdict or None,
        "metrics": None
        if m is None
        else {
            "requests": m.requests,
            "success_rate": m.success_rate,
            "p99_seconds": m.p99,
            "error": m.error,
            # the span of the samples the counts come from (seconds since the epoch)
            "start": m.start,
            "end": m.end,
        },
        "message": state.message,
        # why the rollout ended (promoted, failed checks, inconclusive checks, operator)
        "reason": state.reason or None,
    }


class JsonView:
    """One JSON object per line."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    def event(self, kind: str, state: RolloutState) -> None:
        self.out.write(json.dumps(event_json(kind, state)) + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


class PlainView:
    """One readable line per event, for logs and pipes."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    def event(self, kind: str, state: RolloutState) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(state.updated or time.time()))
        self.out.write(
            f"{stamp} {state.service} {state.phase:<11} weight {state.weight:>3}%  "
            f"{state.message}\n"
        )
        self.out.flush()

    def close(self) -> None:
        pass


class RichView:
    """A live panel that redraws on every event."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=out)
        self._state: RolloutState | None = None
        self._live = Live(console=self.console, auto_refresh=False, transient=False)
        self._live.start()

    def event(self, kind: str, state: RolloutState) -> None:
        self._state = state
        self._live.update(self._render(state), refresh=True)

    def close(self) -> None:
        self._live.stop()

    def _render(self, state: RolloutState) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        s = state.settings
        colour = {"promoted": "green", "rolled-back": "red", "aborted": "red", "paused": "yellow"}
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("phase", f"[{colour.get(state.phase, 'cyan')}]{state.phase}[/]")
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=100, completed=state.weight, width=40), f"{state.weight}%")
        grid.add_row(f"{s.canary}", bar)
        goal = f"{s.iterations} checks" if s.mode != "canary" else f"max {s.max_weight}%"
        grid.add_row(
            "checks",
            f"{state.step} passed ({goal}), {state.failed_checks}/{s.threshold} failed, "
            f"{state.inconclusive_checks}/{s.threshold} inconclusive in a row",
        )
        m = state.last
        if m is not None:
            if m.error is not None:
                shown = m.error
            elif m.requests <= 0:
                shown = "no requests in the window"
            else:
                p99 = "-" if m.p99 is None else f"{m.p99 * 1000:.0f}ms"
                success = "-" if m.success_rate is None else f"{m.success_rate:.2f}%"
                shown = f"success {success}  p99 {p99}  requests {m.requests:.0f}"
            grid.add_row("metrics", shown)
        limits = f"success >= {s.min_success_rate:g}%"
        if s.max_p99 is not None:
            limits += f", p99 <= {s.max_p99 * 1000:.0f}ms"
        grid.add_row("limits", limits)
        if s.match is not None:
            grid.add_row("match", str(s.match))
        events = "\n".join(
            f"{time.strftime('%H:%M:%S', time.localtime(when))}  {message}" if when else message
            for when, message in state.history[-6:]
        )
        title = f"rollout {state.service}: {s.stable} -> {s.canary} ({s.mode})"
        return Panel(Group(grid, "", events), title=title, expand=False)


def make_view(*, json_lines: bool, out: TextIO = sys.stdout) -> View:
    """The view for this output: JSON if asked, rich on a terminal, plain lines otherwise."""
    if json_lines:
        return JsonView(out)
    if out.isatty():
        return RichView(out)
    return PlainView(out)
