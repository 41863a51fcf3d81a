"""gateway: the public API of the weather system.

    GET /forecast?city=Oslo

It asks the `geo` service where the city is, then the `forecast` service for the weather
there. `geo` and `forecast` are mesh service names, not DNS names: meshlib finds their
instances (MESH_STATIC_SERVICES, or Consul with CONSUL_HTTP_ADDR), balances, retries a
failed attempt on another instance, and carries the trace.

    MESH_SERVICE_NAME=gateway meshlib serve gateway:app --port 8000
"""

from flask import Flask, abort, request

import meshlib

app = Flask("gateway")
app.wsgi_app = meshlib.WSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
mesh = meshlib.Client()


@app.get("/forecast")
def forecast() -> dict[str, object]:
    city = request.args.get("city", "")
    place = mesh.get("http://geo/city", params={"name": city})
    if place.status_code == 404:
        abort(404, f"unknown city {city!r}")
    place.raise_for_status()
    where = place.json()
    weather = mesh.get(
        "http://forecast/forecast", params={"lat": where["lat"], "lon": where["lon"]}
    )
    weather.raise_for_status()
    return {"city": where["name"], "lat": where["lat"], "lon": where["lon"], **weather.json()}
