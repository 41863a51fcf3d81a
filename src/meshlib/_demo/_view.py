"""What the demo shows: a live view redrawn in place on a terminal, plain lines otherwise."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ._system import Traffic, WeatherSystem

__all__ = ["View"]

_CLEAR = "\x1b[H\x1b[J"
_BAR = 30


class View:
    """Events, per-instance counts and ejections; a redraw every half second on a TTY."""

    def __init__(self, out: TextIO, duration: float) -> None:
        self.out = out
        self.duration = duration
        self.tty = out.isatty()
        self.start = self._traffic_start = time.monotonic()
        self.events: list[str] = []
        self.trace_lines: list[str] = []
        self.traffic: Traffic | None = None
        self.system: WeatherSystem | None = None
        self._ejected_now: Callable[[], int | None] = lambda: None
        self.ejected = 0
        self._killed: str | None = None
        self._restarted: str | None = None
        self._rates: dict[str, float] = {}
        self._previous: tuple[float, Counter[str]] = (self.start, Counter())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="meshlib-demo-view", daemon=True)

    def _elapsed(self) -> float:
        return time.monotonic() - self.start

    def event(self, text: str) -> None:
        """Something happened: listed in the view, or printed at once without a TTY."""
        line = f"[{self._elapsed():5.1f}s] {text}"
        with self._lock:
            self.events.append(line)
        if not self.tty:
            print(line, file=self.out, flush=True)

    def bind(
        self, traffic: Traffic, system: WeatherSystem, ejected: Callable[[], int | None]
    ) -> None:
        """Start showing ``traffic``; ``ejected`` asks the gateway what it has ejected."""
        self.traffic, self.system, self._ejected_now = traffic, system, ejected
        self._traffic_start = time.monotonic()
        self._thread.start()

    def killed(self, address: str) -> None:
        """An instance was killed: report when the gateway ejects it."""
        self._killed = address

    def restarted(self, address: str) -> None:
        """The killed instance runs again at ``address``."""
        self._restarted = address

    def trace(self, trace_id: str, lines: list[str]) -> None:
        """Show the span tree of one request."""
        self.event(f"sample trace {trace_id}: {len(lines)} spans")
        with self._lock:
            self.trace_lines = lines
        if not self.tty:
            for line in lines:
                print(f"    {line}", file=self.out, flush=True)

    def wait_until(self, when: float) -> None:
        """Sleep until ``when`` (monotonic), while the view thread keeps redrawing."""
        self._stop.wait(max(0.0, when - time.monotonic()))

    def final(self) -> None:
        """Stop redrawing; draw once more."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self.tty:
            self._draw()

    def _loop(self) -> None:
        ticks = 0
        while not self._stop.wait(0.5):
            ticks += 1
            if ticks % 2 == 0:
                self._check_ejection()
                self._update_rates()
            if self.tty:
                self._draw()
            elif ticks % 10 == 0:
                self._progress_line()

    def _check_ejection(self) -> None:
        ejected = self._ejected_now()
        if ejected is None or ejected == self.ejected:
            return
        failed = self.traffic.failures if self.traffic else 0
        if ejected > self.ejected and self._killed:
            self.event(
                f"gateway ejected forecast {self._killed} (outlier detection); "
                f"failed requests so far: {failed}"
            )
        elif ejected < self.ejected:
            self.event(
                "gateway: a forecast instance is no longer ejected "
                "(its ejection ran out, or discovery dropped it)"
            )
        self.ejected = ejected

    def _update_rates(self) -> None:
        if self.traffic is None:
            return
        now, counts = time.monotonic(), Counter(self.traffic.per_instance)
        then, before = self._previous
        span = max(now - then, 1e-6)
        self._rates = {k: (counts[k] - before[k]) / span for k in counts}
        self._previous = (now, counts)

    def _progress_line(self) -> None:
        assert self.traffic is not None
        rates = "  ".join(f"{k} {v:.0f}/s" for k, v in sorted(self._rates.items()))
        print(
            f"[{self._elapsed():5.1f}s] requests {self.traffic.requests}, failed "
            f"{self.traffic.failures}; forecast instances: {rates}",
            file=self.out,
            flush=True,
        )

    def _draw(self) -> None:
        assert self.traffic is not None
        traffic = self.traffic
        counts = Counter(traffic.per_instance)
        top = max(counts.values(), default=1)
        lines = [
            f"meshlib demo   {self._elapsed():5.1f} s of ~{self.duration:g} s   "
            f"requests {traffic.requests}   failed {traffic.failures}   (Ctrl-C stops)",
            "",
            f"{'forecast instance':<22}{'ver':<5}{'req/s':>6}  requests",
        ]
        for instance in sorted(counts):
            state = ""
            if instance == self._killed:
                alive = self.system is not None and any(
                    p.address == instance and p.running for p in self.system.forecasts
                )
                state = "  up again" if alive else "  KILLED"
                if self.ejected:
                    state += ", ejected by the gateway"
            bar = "#" * max(1, round(_BAR * counts[instance] / top))
            lines.append(
                f"{instance:<22}{traffic.versions.get(instance, '?'):<5}"
                f"{self._rates.get(instance, 0.0):>6.1f}  {bar} {counts[instance]}{state}"
            )
        lines += ["", f"gateway: forecast endpoints ejected now: {self.ejected}", "", "events:"]
        with self._lock:
            lines += [f"  {e}" for e in self.events[-12:]]
            if self.trace_lines:
                lines += ["", "one request, traced across the mesh:"]
                lines += [f"  {t}" for t in self.trace_lines]
        self.out.write(_CLEAR + "\n".join(lines) + "\n")
        self.out.flush()

    def summary(self) -> None:
        """The closing summary: requests, failures, requests per instance."""
        traffic = self.traffic
        if traffic is None:
            return
        print(
            f"\nsummary: {traffic.requests} requests in "
            f"{time.monotonic() - self._traffic_start:.1f} s, {traffic.failures} failed",
            file=self.out,
        )
        for instance, count in sorted(traffic.per_instance.items()):
            note = ""
            if instance == self._killed:
                again = ", restarted" if self._restarted == instance else ""
                note = f"  (killed with SIGKILL{again})"
            elif instance == self._restarted:
                note = "  (the killed instance, restarted)"
            version = traffic.versions.get(instance, "?")
            print(f"  forecast {version} {instance:<22}{count:>7}{note}", file=self.out)
        if traffic.failures:
            print(f"  last failure: {traffic.last_error}", file=self.out)
        print("every process the demo started has been stopped", file=self.out, flush=True)
