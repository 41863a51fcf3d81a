"""A file re-read when it changes, keeping the last good version: the loader the local
config file (routing/_local.py) and fault injection (server/_faults.py) share.

The file is read once at construction (a bad file raises ``OSError`` / ``ValueError``, for
the caller to turn into a start-up error) and then whenever its modification time changes,
checked at most every ``check_interval`` seconds on the caller's thread: a ``stat`` on the
request path, the file read only when it changed, no background thread. A version that
does not parse is refused with one logged error and the last good one stays in force; a
file that disappears is reported once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["WatchedFile"]

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """``parse(text)`` of the file at ``path``, kept current; ``current`` never raises."""

    def __init__(
        self,
        path: str,
        parse: Callable[[str], T],
        *,
        what: str,
        logger: logging.Logger,
        check_interval: float = 0.5,
    ) -> None:
        self.path = path
        self.check_interval = check_interval
        self._parse = parse
        #: what a refused version leaves in force, for the log ("configuration")
        self._what = what
        self._logger = logger
        self._listeners: list[Callable[[T], None]] = []
        self._lock = threading.Lock()
        self._mtime = os.stat(path).st_mtime_ns
        self._value = parse(_read(path))
        self._checked = time.monotonic()

    def subscribe(self, listener: Callable[[T], None]) -> None:
        """Call ``listener`` (on the thread that noticed) with every new good version."""
        self._listeners.append(listener)

    def current(self) -> T:
        """The latest good version (checking the file at most every ``check_interval``)."""
        now = time.monotonic()
        if now - self._checked >= self.check_interval and self._lock.acquire(blocking=False):
            try:
                self._checked = now
                self._reload_if_changed()
            finally:
                self._lock.release()
        return self._value

    def _reload_if_changed(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError as exc:
            if self._mtime != -1:
                self._logger.error("%s: %s; keeping the last good %s", self.path, exc, self._what)
                self._mtime = -1
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            value = self._parse(_read(self.path))
        except (OSError, ValueError) as exc:
            self._logger.error(
                "%s is refused (%s); keeping the last good %s", self.path, exc, self._what
            )
            return
        self._value = value
        self._logger.info("%s reloaded", self.path)
        for listener in self._listeners:
            try:
                listener(value)
            except Exception:
                self._logger.exception("a listener of %s failed", self.path)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()
