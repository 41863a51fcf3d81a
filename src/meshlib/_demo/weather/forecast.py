"""forecast: the weather at some coordinates.

v1 gives a temperature and a summary; v2 (``MESH_SERVICE_VERSION=v2``) is a newer model
that adds the wind. Every answer says which version and which instance made it.

    MESH_SERVICE_NAME=forecast MESH_SERVICE_VERSION=v1 meshlib serve forecast:app --port 8011
"""

import datetime
import os
import zlib

from fastapi import FastAPI

import meshlib

VERSION = os.environ.get("MESH_SERVICE_VERSION", "v1")
# `meshlib serve` sets MESH_SERVICE_ADDRESS and MESH_SERVICE_PORT to where it listens.
HOST, PORT = os.environ.get("MESH_SERVICE_ADDRESS", "?"), os.environ.get("MESH_SERVICE_PORT", "?")
INSTANCE = f"{HOST}:{PORT}"
SUMMARIES = ("sunny", "partly cloudy", "cloudy", "rain", "showers", "fog", "snow")

app = FastAPI(title="forecast")
app.add_middleware(meshlib.ASGIMiddleware)


@app.get("/forecast")
async def forecast(lat: float, lon: float) -> dict[str, object]:
    today = datetime.date.today().isoformat()
    seed = zlib.crc32(f"{lat:.2f},{lon:.2f},{today}".encode())
    body: dict[str, object] = {
        "date": today,
        "temperature_c": round(28 - abs(lat) * 0.45 + seed % 70 / 10, 1),
        "summary": SUMMARIES[seed % len(SUMMARIES)],
        "version": VERSION,
        "instance": INSTANCE,
    }
    if VERSION == "v2":
        body["wind_kph"] = seed % 40
    return body
