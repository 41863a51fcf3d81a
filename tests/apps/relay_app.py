"""A gateway that relays to the service ``upstream`` (``meshlib serve relay_app:app``).

``/relay?ms=150`` calls ``upstream``'s ``/slow?ms=150`` with ``meshlib.AsyncClient`` and
answers 502 with the mesh error when that call fails; ``/upstream-state`` is what this
process's mesh knows of ``upstream`` (its endpoints' ejections and its breaker).
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse

import meshlib
from meshlib._runtime import live_meshes
from meshlib._status import status_report

app = FastAPI()
app.add_middleware(meshlib.ASGIMiddleware)
client = meshlib.AsyncClient()


@app.get("/relay")
async def relay(ms: int = 150) -> Any:
    try:
        r = await client.get("http://upstream/slow", params={"ms": ms})
    except httpx.HTTPError as exc:
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, 502)
    return {"upstream": r.json()}


@app.get("/upstream-state")
async def upstream_state() -> Any:
    return status_report(live_meshes())["services"].get("upstream")
