"""The sync and async drivers cannot drift apart: each async twin, read as sync, is its twin.

The request policy lives once, in the sans-IO ``Call`` (``_pipeline.py``); the transports
(``client.py``) only drive it, once with blocking I/O and once with ``await``. Those driver
pairs stay two plain functions, each the direct form of its kind of I/O, and this test
keeps them one source in substance: the async function's syntax tree, with ``await``
dropped, ``async def`` read as ``def`` and the async names mapped to their sync ones, must
equal the sync one's.

The same holds for the server-identity check that runs in httpcore's trace hook
(``security/_verify.py``). The hedged loops are the exception, by design: the sync one
races attempts on worker threads (``_Race``), the async one in a task group; their shared
decisions are the Call's.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from meshlib import _core, client

#: async name -> its sync twin's name
_NAMES = {
    "handle_async_request": "handle_request",
    "AsyncBaseTransport": "BaseTransport",
    "_aread_within_attempt": "_read_within_attempt",
    "AsyncNetworkStream": "NetworkStream",
    "_AsyncCheckedStream": "_CheckedStream",
    "aclose": "close",
    "aread": "read",
    "anyio": "time",
}

PAIRS = [
    (client.MeshTransport.handle_request, client.AsyncMeshTransport.handle_async_request),
    (client.MeshTransport._bypass, client.AsyncMeshTransport._bypass),
    (client.MeshTransport._pool, client.AsyncMeshTransport._pool),
    (client._read_within_attempt, client._aread_within_attempt),
    (_core._CheckedStream.start_tls, _core._AsyncCheckedStream.start_tls),
    (_core.CheckedBackend.connect_tcp, _core.AsyncCheckedBackend.connect_tcp),
]


class _AsSync(ast.NodeTransformer):
    """The async tree as its sync twin would be written."""

    def visit_Await(self, node: ast.Await) -> Any:
        return self.visit(node.value)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> Any:
        self.generic_visit(node)
        return ast.FunctionDef(**{f: getattr(node, f) for f in node._fields})

    def visit_Call(self, node: ast.Call) -> Any:
        self.generic_visit(node)
        # anyio.to_thread.run_sync(f, *args) is the blocking call f(*args), on a thread
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "run_sync":
            return ast.Call(func=node.args[0], args=node.args[1:], keywords=node.keywords)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> Any:
        self.generic_visit(node)
        node.attr = _NAMES.get(node.attr, node.attr)
        return node

    def visit_Name(self, node: ast.Name) -> Any:
        node.id = _NAMES.get(node.id, node.id)
        return node


def _tree(function: Callable[..., Any], *, as_sync: bool = False) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    node = tree.body[0]
    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    node.name = _NAMES.get(node.name, node.name)
    node.body = [s for s in node.body if not _docstring(s)]
    node.returns = None  # the return annotations name each side's own types
    if as_sync:
        tree = _AsSync().visit(tree)
    return ast.dump(tree, include_attributes=False)


def _docstring(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)


@pytest.mark.parametrize(("sync", "async_"), PAIRS, ids=lambda f: f.__qualname__)
def test_the_async_driver_is_its_sync_twin(
    sync: Callable[..., Any], async_: Callable[..., Any]
) -> None:
    assert _tree(async_, as_sync=True) == _tree(sync), (
        f"{async_.__qualname__} no longer does what {sync.__qualname__} does: change both"
    )


def test_the_check_sees_a_difference() -> None:
    """It can fail: two twins that differ by one statement do not compare equal."""

    def sync(x: int) -> int:
        return x + 1

    async def async_(x: int) -> int:
        return x + 2

    assert _tree(async_, as_sync=True) != _tree(sync)
