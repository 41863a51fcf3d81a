"""The Prometheus text format, read: ``/mesh/metrics`` as (name, labels) -> value.

Only what the dashboard and ``meshlib rollout``'s scrapes need: sample lines, label values
with the three escapes the format defines (``\\\\``, ``\\"``, ``\\n``); comments and
timestamps are skipped.
"""

from __future__ import annotations

import math
import re

__all__ = ["Samples", "parse"]

#: (metric name, sorted label pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and labels."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        pairs = tuple(
            sorted(
                (key, re.sub(r"\\.", lambda m: _UNESCAPE.get(m.group(0), m.group(0)), raw))
                for key, raw in _LABEL.findall(labels or "")
            )
        )
        try:
            number = float(value)
        except ValueError:
            continue
        if not math.isnan(number):
            samples[(name, pairs)] = number
    return samples
