"""gateway: the public API of the weather system.

    GET /forecast?city=Oslo

It asks the `geo` service where the city is, then the `forecast` service for the weather
there. `geo` and `forecast` are mesh service names, not DNS names: meshlib finds their
instances (MESH_STATIC_SERVICES, or Consul with CONSUL_HTTP_ADDR), balances, retries a
failed attempt on another instance, and carries the trace.

    MESH_SERVICE_NAME=gateway meshlib serve gateway:app --port 8000
"""

from fastapi import FastAPI, HTTPException

import meshlib

app = FastAPI(title="weather gateway")
app.add_middleware(meshlib.ASGIMiddleware)
mesh = meshlib.AsyncClient()


@app.get("/forecast")
async def forecast(city: str) -> dict[str, object]:
    place = await mesh.get("http://geo/city", params={"name": city})
    if place.status_code == 404:
        raise HTTPException(404, f"unknown city {city!r}")
    place.raise_for_status()
    where = place.json()
    weather = await mesh.get(
        "http://forecast/forecast", params={"lat": where["lat"], "lon": where["lon"]}
    )
    weather.raise_for_status()
    return {"city": where["name"], "lat": where["lat"], "lon": where["lon"], **weather.json()}
