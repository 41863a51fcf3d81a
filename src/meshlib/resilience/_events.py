"""One log line per resilience event: a breaker transition, an ejection, a readmission.

Each line is readable as it stands and structured for log pipelines: the message ends in
``key=value`` pairs (``event=breaker.open service=geo ...``), and the same fields ride on the
record as ``record.meshlib_event`` (a dict) for JSON formatters. Events are logged on
``meshlib.resilience`` -- WARNING when traffic is being refused or diverted (a breaker
opening, an endpoint ejected), INFO when it comes back.

Lines are rate-limited per event kind and service: at most ``burst`` lines in any ``window``
seconds (a breaker flapping open -> half-open -> open every reset timeout, or a large set
ejecting endpoints one after another, must not flood the log). What was left out is counted
and reported on the next line that is written, as ``suppressed=N``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["EVENTS", "EventLog"]

_Value = str | int | float


class EventLog:
    """Writes resilience events as rate-limited, structured log lines."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        #: (event, service) -> (window start, lines written in it, lines suppressed)
        self._seen: dict[tuple[str, str], tuple[float, int, int]] = {}

    def emit(self, level: int, event: str, service: str, text: str, **fields: _Value) -> bool:
        """Log ``text`` for ``event`` on ``service`` unless over the limit; True if logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        key = (event, service)
        with self._lock:
            start, written, suppressed = self._seen.get(key, (now, 0, 0))
            if now - start >= self.window:
                start, written = now, 0
            if written >= self.burst:
                self._seen[key] = (start, written, suppressed + 1)
                return False
            self._seen[key] = (start, written + 1, 0)
        record: dict[str, _Value] = {"event": event, "service": service, **fields}
        if suppressed:
            record["suppressed"] = suppressed
        pairs = " ".join(f"{name}={_format(value)}" for name, value in record.items())
        self.logger.log(level, "%s (%s)", text, pairs, extra={"meshlib_event": record})
        return True


def _format(value: _Value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return text if text and " " not in text and "=" not in text else repr(text)


#: The process's event log (one, like the loggers it writes to).
EVENTS = EventLog(logging.getLogger("meshlib.resilience"))
