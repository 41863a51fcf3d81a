"""One app for the three-service chain gateway -> forecast -> geo (``meshlib serve chain_app:app``).

Which link it is comes from ``MESH_SERVICE_NAME``. Each calls the next with
``meshlib.AsyncClient``; ``fail=1`` makes forecast answer 500; a ``token`` geo has not
seen before makes geo answer 503 once, so forecast's mesh client retries.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from opentelemetry import trace

import meshlib

app = FastAPI()
app.add_middleware(meshlib.ASGIMiddleware)
SERVICE = os.environ.get("MESH_SERVICE_NAME", "?")
VERSION = os.environ.get("MESH_SERVICE_VERSION", "")
client = meshlib.AsyncClient()
SEEN: set[str] = set()


def _trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""


@app.get("/plan")
async def plan(token: str = "", fail: int = 0) -> Any:
    r = await client.get("http://forecast/forecast", params={"token": token, "fail": fail})
    body = {"via": "gateway", "trace_id": _trace_id(), "gateway_version": VERSION, **r.json()}
    return JSONResponse(body, r.status_code)


@app.get("/forecast")
async def forecast(token: str = "", fail: int = 0) -> Any:
    r = await client.get("http://geo/geo", params={"token": token})
    info = r.extensions["meshlib"]
    body = {
        "forecast": "sunny",
        "forecast_version": VERSION,
        "geo": r.json(),
        "geo_attempts": info.attempts,
    }
    return JSONResponse(body, 500 if fail else 200)


@app.get("/geo")
async def geo(token: str = "") -> Any:
    if token and token not in SEEN:
        SEEN.add(token)
        return JSONResponse({"error": "warming up"}, 503)
    return {"lat": 59.9, "lon": 10.7, "geo_version": VERSION}
