"""geo: city name -> coordinates, from a small built-in table.

MESH_SERVICE_NAME=geo meshlib serve geo:app --port 8003
"""

from flask import Flask, abort, request

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

app = Flask("geo")
app.wsgi_app = meshlib.WSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]


@app.get("/city")
def city() -> dict[str, object]:
    name = request.args.get("name", "")
    if name.lower() not in CITIES:
        abort(404, f"unknown city {name!r}")
    display, lat, lon = CITIES[name.lower()]
    return {"name": display, "lat": lat, "lon": lon}
