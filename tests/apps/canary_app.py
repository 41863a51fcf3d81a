"""A versioned app for rollout tests (``meshlib serve canary_app:app``).

``MESH_SERVICE_VERSION`` labels its metrics; ``MESH_TEST_FAIL_PERCENT`` (0-100) makes that
share of ``/work`` requests answer 503, so a canary can be made bad on demand. Failures come
in runs: the first ``fail`` of every ``period`` requests (or the last ones, with ``tail``).

``POST /control?fail=30&status=500&period=100&tail=1`` changes that while the app runs and
starts counting afresh, so a test can make a healthy canary fail from a chosen moment, with
a status code (a Prometheus series) it has never answered before.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, Response

import meshlib

app = FastAPI()
app.add_middleware(meshlib.ASGIMiddleware)
_MODE: dict[str, int] = {
    "fail": int(os.environ.get("MESH_TEST_FAIL_PERCENT", "0")),
    "status": 503,
    "period": 100,
    "tail": 0,
    "count": 0,
}


@app.get("/work")
async def work(response: Response) -> dict[str, Any]:
    n = _MODE["count"]
    _MODE["count"] = n + 1
    period = _MODE["period"]
    failing = period * _MODE["fail"] // 100
    position = n % period
    if (position >= period - failing) if _MODE["tail"] else (position < failing):
        response.status_code = _MODE["status"]
    return {"version": os.environ.get("MESH_SERVICE_VERSION"), "n": n}


@app.post("/control")
async def control(
    fail: int = 0, status: int = 503, period: int = 100, tail: int = 0
) -> dict[str, int]:
    _MODE.update(fail=fail, status=status, period=period, tail=tail, count=0)
    return _MODE
