"""A small real HTTP backend for the tests, run under uvicorn in its own process.

    python tests/backend_server.py --port 8001 --name a

Routes:
  GET  /whoami              -> the instance name
  ANY  /echo                -> JSON with the method, headers and body length it received
  GET  /status/<code>       -> that status
  GET  /slow?ms=N           -> answers after N ms
  GET  /set-cookie?k=v      -> 200 with ``Set-Cookie: k=v; Path=/``
  POST /admin/mode          -> JSON {"status": int|null, "delay_ms": int, "hang": bool,
                               "hold": bool} applies to every non-admin request from then on
  POST /admin/release       -> requests held (mode "hold") go on and answer
  GET  /admin/stats         -> JSON counts of non-admin requests received, by method; with
                               "hold": "held", "released", and "disconnected" (the client
                               went away while its request was held)

``--cold N:MS`` delays the first N requests by MS ms (a cold start: imports, caches).

Everything a test asserts about "what the server received" comes from /admin/stats, so
the counts are the server's own, not the client's belief.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from typing import Any

NAME = "backend"
STATS: Counter[str] = Counter()
MODE: dict[str, Any] = {
    "status": None,
    "delay_ms": 0,
    "hang": False,
    "hold": False,
    # send the headers and part of the body, then drop the connection (a crash mid-body)
    "cut": False,
}
#: ``--cold``: how many requests are still to be delayed, and by how long (ms)
COLD: list[int] = [0, 0]
#: Set by /admin/release (then replaced, so later requests are held again).
RELEASE: list[asyncio.Event] = []


async def _hold(receive: Any) -> bool:
    """Hold a request until /admin/release; True if the client went away first."""
    if not RELEASE:
        RELEASE.append(asyncio.Event())
    STATS["held"] += 1
    released = asyncio.ensure_future(RELEASE[0].wait())
    gone = asyncio.ensure_future(_disconnected(receive))
    done, pending = await asyncio.wait({released, gone}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if gone in done:
        STATS["disconnected"] += 1
        return True
    STATS["released"] += 1
    return False


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(
    send: Any,
    status: int,
    body: bytes,
    ctype: str = "text/plain",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", ctype.encode()),
                (b"x-instance", NAME.encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path: str = scope["path"]
    method: str = scope["method"]
    body = await _body(receive)
    if path == "/admin/stats":
        await _send(send, 200, json.dumps(dict(STATS)).encode(), "application/json")
        return
    if path == "/admin/mode":
        MODE.update(json.loads(body or b"{}"))
        await _send(send, 200, json.dumps(MODE).encode(), "application/json")
        return
    if path == "/admin/release":
        if RELEASE:
            RELEASE.pop().set()
        await _send(send, 200, b"released")
        return
    STATS[method] += 1
    STATS["total"] += 1
    if MODE["hold"] and await _hold(receive):
        return  # nobody is listening any more
    if COLD[0] > 0:
        COLD[0] -= 1
        await asyncio.sleep(COLD[1] / 1000)
    if MODE["hang"]:
        await asyncio.Event().wait()  # accept, never answer (until the client gives up)
    if MODE["delay_ms"]:
        await asyncio.sleep(MODE["delay_ms"] / 1000)
    if MODE["cut"]:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"1000"), (b"x-instance", NAME.encode())],
            }
        )
        await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
        raise RuntimeError("cut mid-body (on purpose)")  # uvicorn drops the connection
    if MODE["status"]:
        extra = (
            [(b"retry-after", str(MODE["retry_after"]).encode())]
            if MODE.get("retry_after") is not None
            else []
        )
        await _send(
            send, int(MODE["status"]), f"{NAME} says {MODE['status']}".encode(), headers=extra
        )
        return
    if path == "/whoami":
        await _send(send, 200, NAME.encode())
    elif path == "/echo":
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        payload = {"method": method, "headers": headers, "body_length": len(body), "instance": NAME}
        await _send(send, 200, json.dumps(payload).encode(), "application/json")
    elif path.startswith("/status/"):
        await _send(send, int(path.rsplit("/", 1)[1]), b"as asked")
    elif path == "/set-cookie":
        cookie = scope["query_string"] + b"; Path=/"
        await _send(send, 200, b"set", headers=[(b"set-cookie", cookie)])
    elif path == "/slow":
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if p)
        await asyncio.sleep(int(query.get("ms", "100")) / 1000)
        await _send(send, 200, NAME.encode())
    else:
        await _send(send, 404, b"no such route")


def main() -> None:
    global NAME
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="backend")
    parser.add_argument("--cold", default="0:0", help="N:MS: delay the first N requests")
    args = parser.parse_args()
    NAME = args.name
    COLD[:] = [int(part) for part in args.cold.split(":")]
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
