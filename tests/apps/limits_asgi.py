"""A FastAPI app for the inbound limit and fault tests (``meshlib serve limits_asgi:app``).

``POST /hold`` reads its whole request body before answering, so a test holds the handler
in flight for exactly as long as it keeps the body open: no sleeps, no timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

import meshlib

app = FastAPI()
app.add_middleware(meshlib.ASGIMiddleware)
HANDLED: dict[str, int] = {}


def _count(name: str) -> None:
    HANDLED[name] = HANDLED.get(name, 0) + 1


@app.get("/hello")
async def hello() -> dict[str, Any]:
    _count("hello")
    return {"hello": "world"}


@app.post("/hold")
async def hold(request: Request) -> dict[str, Any]:
    _count("hold")
    body = await request.body()
    return {"received": len(body)}


@app.get("/boom")
async def boom() -> None:
    _count("boom")
    raise RuntimeError("the handler failed (on purpose)")


@app.get("/stream")
async def stream() -> StreamingResponse:
    _count("stream")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100_000):
            yield b"x" * 1024
            await asyncio.sleep(0.005)

    return StreamingResponse(chunks(), media_type="application/octet-stream")


@app.get("/deadline")
async def deadline(request: Request) -> dict[str, Any]:
    _count("deadline")
    found = request.scope.get("meshlib.deadline")
    return {"remaining": None if found is None else found.remaining()}


@app.get("/handled")
async def handled() -> dict[str, int]:
    return HANDLED
