"""Run inside a private network namespace (tests/test_admin_netns.py): ask a real
``meshlib serve``'s admin listener from a non-loopback source address, with forged headers.

Prints one JSON object: {label: status} for each request. Only the namespace's own ``lo``
carries traffic (10.253.0.1 and 10.253.0.2 are aliases on it).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time

SERVER, REMOTE, PORT = "10.253.0.1", "10.253.0.2", 18800
FORGED = {
    "x-forwarded-for": {"X-Forwarded-For": "127.0.0.1"},
    "forwarded": {"Forwarded": "for=127.0.0.1"},
    "host-localhost": {"Host": "localhost"},
    "host-loopback": {"Host": "127.0.0.1"},
    "all": {"X-Forwarded-For": "127.0.0.1", "Forwarded": "for=127.0.0.1", "Host": "localhost",
            "X-Real-IP": "127.0.0.1"},
}  # fmt: skip


def ask(source: str, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection(SERVER, PORT, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", "/mesh/status", headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def main() -> None:
    env = {**os.environ, "MESH_SERVICE_NAME": "hello", "MESH_ADMIN_ADDR": f"{SERVER}:{PORT}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "meshlib", "serve", sys.argv[1], "--port", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                ask("127.0.0.1", {})
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)  # the server is starting
        results = {"loopback-source": ask("127.0.0.1", {}), "remote-plain": ask(REMOTE, {})}
        for label, headers in FORGED.items():
            results[f"remote-{label}"] = ask(REMOTE, headers)
        print(json.dumps(results))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
