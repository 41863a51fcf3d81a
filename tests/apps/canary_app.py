"""A versioned app for rollout tests (``meshlib serve canary_app:app``).

``MESH_SERVICE_VERSION`` labels its metrics; ``MESH_TEST_FAIL_PERCENT`` (0-100) makes that
share of ``/work`` requests answer 503, so a canary can be made bad on demand.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from fastapi import FastAPI, Response

import meshlib

app = FastAPI()
app.add_middleware(meshlib.ASGIMiddleware)
_FAIL = int(os.environ.get("MESH_TEST_FAIL_PERCENT", "0"))
_COUNT = itertools.count()


@app.get("/work")
async def work(response: Response) -> dict[str, Any]:
    n = next(_COUNT)
    if n % 100 < _FAIL:
        response.status_code = 503
    return {"version": os.environ.get("MESH_SERVICE_VERSION"), "n": n}
