"""geo: city name -> coordinates, from a small built-in table.

MESH_SERVICE_NAME=geo meshlib serve geo:app --port 8003
"""

from fastapi import FastAPI, HTTPException

import meshlib

CITIES = {
    "oslo": ("Oslo", 59.91, 10.75),
    "bergen": ("Bergen", 60.39, 5.32),
    "london": ("London", 51.51, -0.13),
    "paris": ("Paris", 48.86, 2.35),
    "nairobi": ("Nairobi", -1.29, 36.82),
    "tokyo": ("Tokyo", 35.68, 139.69),
    "lima": ("Lima", -12.05, -77.04),
    "sydney": ("Sydney", -33.87, 151.21),
}

app = FastAPI(title="geo")
app.add_middleware(meshlib.ASGIMiddleware)


@app.get("/city")
async def city(name: str) -> dict[str, object]:
    try:
        display, lat, lon = CITIES[name.lower()]
    except KeyError:
        raise HTTPException(404, f"unknown city {name!r}") from None
    return {"name": display, "lat": lat, "lon": lon}
