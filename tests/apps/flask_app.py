"""A Flask app in the mesh, for the tests (``meshlib serve flask_app:app``)."""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Flask, request

import meshlib

app = Flask(__name__)
app.wsgi_app = meshlib.WSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
HANDLED = {"count": 0}


@app.get("/hello")
def hello() -> dict[str, Any]:
    HANDLED["count"] += 1
    return {"hello": os.environ.get("MESH_SERVICE_NAME", "?"), "pid": os.getpid()}


@app.get("/slow")
def slow() -> dict[str, Any]:
    HANDLED["count"] += 1
    ms = int(request.args.get("ms", "100"))
    time.sleep(ms / 1000)
    return {"slept_ms": ms, "pid": os.getpid()}


@app.get("/handled")
def handled() -> dict[str, int]:
    return HANDLED


@app.get("/deadline")
def deadline() -> dict[str, Any]:
    HANDLED["count"] += 1
    found = request.environ.get("meshlib.deadline")
    return {"remaining": None if found is None else found.remaining()}


@app.get("/peer")
def peer() -> dict[str, Any]:
    HANDLED["count"] += 1
    identity = meshlib.peer_identity(request)
    return {"peer": None if identity is None else str(identity)}


@app.get("/header/<name>")
def header(name: str) -> dict[str, Any]:
    HANDLED["count"] += 1
    return {"value": request.headers.get(name)}


@app.get("/client")
def client() -> dict[str, Any]:
    return {"host": request.remote_addr, "scheme": request.scheme}
