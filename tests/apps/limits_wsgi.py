"""A Flask app for the inbound limit and fault tests (``meshlib serve limits_wsgi:app``).

``POST /hold`` reads its whole request body before answering, so a test holds the handler
in flight for exactly as long as it keeps the body open: no sleeps, no timing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, request

import meshlib

app = Flask(__name__)
app.wsgi_app = meshlib.WSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
HANDLED: dict[str, int] = {}
_lock = threading.Lock()


def _count(name: str) -> None:
    with _lock:
        HANDLED[name] = HANDLED.get(name, 0) + 1


@app.get("/hello")
def hello() -> dict[str, Any]:
    _count("hello")
    return {"hello": "world"}


@app.post("/hold")
def hold() -> dict[str, Any]:
    _count("hold")
    return {"received": len(request.get_data())}


@app.get("/boom")
def boom() -> None:
    _count("boom")
    raise RuntimeError("the handler failed (on purpose)")


@app.get("/stream")
def stream() -> Response:
    _count("stream")

    def chunks() -> Iterator[bytes]:
        for _ in range(100_000):
            yield b"x" * 1024
            time.sleep(0.005)

    return Response(chunks(), mimetype="application/octet-stream")


@app.get("/deadline")
def deadline() -> dict[str, Any]:
    _count("deadline")
    found = request.environ.get("meshlib.deadline")
    return {"remaining": None if found is None else found.remaining()}


@app.get("/handled")
def handled() -> dict[str, int]:
    return HANDLED
