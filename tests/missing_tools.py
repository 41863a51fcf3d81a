"""A pytest plugin: tests that need an external program get it from ``tools.find_tool``.

``require_tool(name)`` returns the path of a working binary (found, cached, or built on
first use with the build's progress shown on the terminal). Where a tool truly cannot be had
(no Go to build it, a build that failed), the test that needs it is skipped with one line that
starts ``missing tool:`` and says how to get it.

A run that must prove everything (CI) sets ``MESH_TEST_REQUIRE_TOOLS=1``: then any such skip
makes the whole run fail, with the skipped tests named in the summary.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from functools import cache

import pytest

from tools import ToolUnavailable, find_tool, missing_tool_hint

_config: pytest.Config | None = None
_SKIP_PREFIX = "missing tool:"


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


@cache
def _find(name: str) -> str | ToolUnavailable:
    capture = _config.pluginmanager.getplugin("capturemanager") if _config else None
    # A first build takes minutes: let its progress reach the terminal.
    with capture.global_and_fixture_disabled() if capture is not None else nullcontext():
        try:
            return find_tool(name)
        except ToolUnavailable as exc:
            return exc


def require_tool(name: str) -> str:
    """The path of ``name``, or skip the calling test with how to get it."""
    found = _find(name)
    if isinstance(found, ToolUnavailable):
        reason = str(found).splitlines()[0]
        pytest.skip(f"{missing_tool_hint(name)} ({reason})")
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get("MESH_TEST_REQUIRE_TOOLS"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    missing = [
        report.nodeid
        for report in skipped
        if isinstance(report.longrepr, tuple) and _SKIP_PREFIX in report.longrepr[2]
    ]
    if missing:
        if reporter is not None:
            reporter.write_line(
                f"MESH_TEST_REQUIRE_TOOLS is set and {len(missing)} test(s) were skipped "
                f"for a missing tool: {', '.join(missing)}",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
