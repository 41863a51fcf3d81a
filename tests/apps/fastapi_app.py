"""A FastAPI app in the mesh, for the tests (``meshlib serve fastapi_app:app``)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import FastAPI, Request

import meshlib

app = FastAPI()
app.add_middleware(meshlib.ASGIMiddleware)
HANDLED = {"count": 0}


@app.get("/hello")
async def hello() -> dict[str, Any]:
    HANDLED["count"] += 1
    return {"hello": os.environ.get("MESH_SERVICE_NAME", "?"), "pid": os.getpid()}


@app.get("/slow")
async def slow(ms: int = 100) -> dict[str, Any]:
    HANDLED["count"] += 1
    await asyncio.sleep(ms / 1000)
    return {"slept_ms": ms, "pid": os.getpid()}


@app.get("/handled")
async def handled() -> dict[str, int]:
    return HANDLED


@app.get("/deadline")
async def deadline(request: Request) -> dict[str, Any]:
    HANDLED["count"] += 1
    found = request.scope.get("meshlib.deadline")
    return {"remaining": None if found is None else found.remaining()}


@app.get("/peer")
async def peer(request: Request) -> dict[str, Any]:
    HANDLED["count"] += 1
    identity = meshlib.peer_identity(request)
    return {"peer": None if identity is None else str(identity)}


@app.get("/loop")
async def loop() -> dict[str, str]:
    return {"loop": type(asyncio.get_running_loop()).__module__}


@app.get("/header/{name}")
async def header(name: str, request: Request) -> dict[str, Any]:
    HANDLED["count"] += 1
    return {"value": request.headers.get(name)}


@app.get("/client")
async def client(request: Request) -> dict[str, Any]:
    return {"host": request.client.host if request.client else None, "scheme": request.url.scheme}
