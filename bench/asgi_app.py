"""Row 7's app: the smallest ASGI app, served by ``meshlib serve`` and by plain uvicorn.

    meshlib serve asgi_app:app            (bench/ on the import path)
    python -m uvicorn --app-dir bench asgi_app:app

No framework, so what the row measures is the server and, under ``meshlib serve``, the mesh
around the app. Two routes:

* ``/`` answers ``200 ok`` (the request measured);
* ``/server`` answers which event loop and which uvicorn HTTP protocol run the app, as JSON
  (``{"loop": "asyncio", "http": "h11"}``): read from the running process, so the bench
  serves the plain side on the same ones whatever ``meshlib serve`` picks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_OK = b"ok"


def server_facts(receive: Receive) -> dict[str, str]:
    """The loop (``asyncio``, ``uvloop``) and HTTP protocol (``h11``, ``httptools``) in use.

    uvicorn hands the app its request cycle's bound ``receive``; the cycle's class lives in
    ``uvicorn.protocols.http.<h11|httptools>_impl`` (or subclasses one that does).
    """
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    http = "unknown"
    owner = getattr(receive, "__self__", None)
    for cls in type(owner).__mro__:
        module = cls.__module__
        if module.startswith("uvicorn.protocols.http.") and module.endswith("_impl"):
            http = module.rsplit(".", 1)[1].removesuffix("_impl")
            break
    return {"loop": loop, "http": http}


async def app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    """``/``: 200 ``ok``; ``/server``: ``server_facts`` as JSON; lifespan acknowledged."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = json.dumps(server_facts(receive)).encode() if scope["path"] == "/server" else _OK
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
