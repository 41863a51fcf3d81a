"""A ``ConfigError`` raised while an ASGI app starts up: one line, not a traceback.

An app that builds its meshlib client in its lifespan (FastAPI's ``lifespan=`` or
``on_event("startup")``) meets a bad ``MESH_`` value there, after ``meshlib serve`` has
checked the environment it started with (the app may have read its own settings file).
Starlette sends ``lifespan.startup.failed`` with the formatted traceback and re-raises;
uvicorn logs that text, then "Application startup failed. Exiting.", and exits with status
3: twenty-five lines around the one that says what to fix. ``StartupErrors`` wraps the
app the server runs: it holds the failure message back until it knows the cause, tells
uvicorn "failed" without a message when the cause is a ``ConfigError``, and keeps that
error for ``meshlib serve`` to report as it reports every other one. Any other exception
reaches uvicorn untouched, with its traceback.

With ``--workers`` the app starts in each worker process, so the error is also handed to
``report`` (which writes it where the supervising process reads it: ``_serve.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .._exceptions import ConfigError

__all__ = ["StartupErrors"]

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


class StartupErrors:
    """Wraps an ASGI app; ``config_error`` is the ``ConfigError`` its startup raised."""

    def __init__(self, app: ASGIApp, report: Callable[[ConfigError], None] | None = None) -> None:
        self.app = app
        self.report = report
        self.config_error: ConfigError | None = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        started = False
        held: list[Message] = []

        async def hold_failure(message: Message) -> None:
            nonlocal started
            if message["type"] == "lifespan.startup.failed":
                held.append(message)  # sent once the cause is known
                return
            started = started or message["type"] == "lifespan.startup.complete"
            await send(message)

        try:
            await self.app(scope, receive, hold_failure)
        except BaseException as exc:
            error = _config_error(exc)
            if error is None or started:
                for message in held:
                    await send(message)
                raise
            self.config_error = error
            if self.report is not None:
                self.report(error)
            await send({"type": "lifespan.startup.failed", "message": ""})
            return
        for message in held:
            await send(message)

    def quiet(self, record: logging.LogRecord) -> bool:
        """A ``logging`` filter: uvicorn's own "startup failed" line adds nothing to ours."""
        return self.config_error is None or "startup failed" not in record.getMessage()


def _config_error(exc: BaseException) -> ConfigError | None:
    """``exc`` itself, or the only exception in a group (a task group in the lifespan)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, ConfigError) else None
