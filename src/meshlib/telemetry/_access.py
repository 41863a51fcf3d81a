"""Access logs: one JSON line per inbound and per outbound logical request.

Through the standard ``logging`` module, on the loggers ``meshlib.access.inbound`` and
``meshlib.access.outbound`` at INFO, switched on by ``MESH_ACCESS_LOG=json`` (off by
default, as in Envoy and Linkerd: a line per request is a cost and a volume to opt into).
The record's message is the JSON line; the same fields are on the record as
``record.access`` for structured handlers. When ``meshlib.access`` has no handler of its
own, meshlib adds one writing the bare line to stderr, stdout or a file
(``MESH_ACCESS_LOG_FILE``), and stops propagation, so the line is not written twice; an
application that configured handlers there keeps them.

No secrets: no headers, no query strings, no request or response bodies -- method, path,
services, status, timing, attempts and trace ids only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["INBOUND", "OUTBOUND", "emit", "install_handler"]

INBOUND = logging.getLogger("meshlib.access.inbound")
OUTBOUND = logging.getLogger("meshlib.access.outbound")
_PARENT = logging.getLogger("meshlib.access")


def install_handler(destination: str = "stderr") -> None:
    """Give ``meshlib.access`` a handler writing to ``destination`` (``stderr``, ``stdout``
    or a file path, ``MESH_ACCESS_LOG_FILE``) and INFO level, unless it has a handler."""
    if _PARENT.handlers:
        return
    handler: logging.Handler
    if destination == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    elif destination == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(destination, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    _PARENT.addHandler(handler)
    _PARENT.propagate = False
    if _PARENT.level == logging.NOTSET or _PARENT.level > logging.INFO:
        _PARENT.setLevel(logging.INFO)


def emit(logger: logging.Logger, fields: dict[str, Any]) -> None:
    """Log one access line (``fields`` in order; ``time`` is added first)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    record = {"time": _now(), **fields}
    logger.info(json.dumps(record, separators=(",", ":")), extra={"access": record})


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
