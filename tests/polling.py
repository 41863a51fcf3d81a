"""Waiting for a condition in tests: poll it until a deadline, never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 5.0, *, what: str = "", interval: float = 0.01
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Fails the test with ``what`` and the last value if ``timeout`` seconds pass first. Use
    this instead of a fixed sleep: it returns as soon as the condition holds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what or predicate!r}; "
                f"last value: {value!r}"
            )
        time.sleep(interval)
