"""Marks that follow a request: headers carried from an inbound request to its outbound calls.

A router rule on a header (``x-debug: 1`` -> the ``debug`` subset) pins only the hop that
sees the header. To route a request by the same rule on every later hop, the operator names
the header in ``MESH_PROPAGATE_HEADERS``: the inbound middleware takes its value from the
request it admits (``marks_of``) and keeps it in ``inbound_marks`` for the task or thread
serving it, and every mesh call made meanwhile carries it (``carry``) unless the call sets
the header itself. So a request marked at the edge reaches the debug version of every
service it touches, as Envoy's header-based routing does with a propagated header or W3C
``baggage`` (name ``baggage`` to carry that as a whole).

A header that steers routing is trusted only from the mesh (DESIGN.md, "Headers that
steer"): marks are taken from an identified mesh caller only, unless
``MESH_PROPAGATE_UNIDENTIFIED=honour``. An edge facing unidentified callers sets the mark
on its own outbound calls (its code decides who may debug); a mark an outsider sent is not
carried on. Marks go to mesh services only, never to hosts outside the mesh.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping, Sequence

import httpx

__all__ = ["Marks", "carry", "inbound_marks", "marks_of"]

#: (lower-case header name, value) pairs
Marks = tuple[tuple[str, str], ...]

#: The marks of the inbound request this task or thread is serving.
inbound_marks: contextvars.ContextVar[Marks] = contextvars.ContextVar(
    "meshlib_inbound_marks", default=()
)


def marks_of(names: Sequence[str], headers: Mapping[str, str], trusted: bool) -> Marks:
    """The marks to carry from an inbound request (``headers``: lower-case names)."""
    if not names or not trusted:
        return ()
    return tuple((name, headers[name]) for name in names if name in headers)


def carry(request: httpx.Request) -> None:
    """Put the current inbound marks on an outbound mesh ``request`` (its own win)."""
    marks = inbound_marks.get()
    for name, value in marks:
        if name not in request.headers:
            request.headers[name] = value
