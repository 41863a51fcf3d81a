"""tests/tools.py provides the suite's external programs; missing_tools skips or fails without."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import TOOLS, ToolUnavailable, find_tool, inherited_directives

TESTS = Path(__file__).resolve().parent


def test_inherited_directives_copy_excludes_and_versioned_replacements_only() -> None:
    go_mod = """\
module example.com/project

require k8s.io/klog v1.0.0

replace (
\texample.com/project/api => ./api
\tk8s.io/klog => github.com/example/klog-gokit v0.3.0 // logs through go-kit
)

replace example.com/other => ../other
replace example.com/pinned v1.2.0 => example.com/pinned v1.2.1

exclude (
\texample.com/msgpack v1.1.5 // breaks the encoding
)
exclude example.com/bad v0.1.0
"""

    assert inherited_directives(go_mod) == [
        "replace k8s.io/klog => github.com/example/klog-gokit v0.3.0",
        "replace example.com/pinned v1.2.0 => example.com/pinned v1.2.1",
        "exclude example.com/msgpack v1.1.5",
        "exclude example.com/bad v0.1.0",
    ]


def test_every_tool_is_found_and_runs() -> None:
    for name in TOOLS:
        path = find_tool(name, build_missing=False)
        flag = "version" if name == "consul" else "--version"
        assert subprocess.run([path, flag], capture_output=True, check=False).returncode == 0


def test_a_broken_override_is_refused_with_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_TEST_AMTOOL", "/bin/false")

    with pytest.raises(ToolUnavailable, match=r"MESH_TEST_AMTOOL='/bin/false' is not a working"):
        find_tool("amtool")


def test_without_go_a_missing_tool_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MESH_TEST_PROMTOOL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("PATH", str(tmp_path))  # no promtool, no go

    with pytest.raises(ToolUnavailable, match=r"the Go toolchain \(`go`\) is not on PATH"):
        find_tool("promtool")


def _run_suite(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["missing_tools"]\n')
    (tmp_path / "test_needs_amtool.py").write_text(
        "from missing_tools import require_tool\n\n\n"
        "def test_needs_amtool():\n"
        '    require_tool("amtool")\n'
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MESH_TEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
        env={**environ, "PYTHONPATH": str(TESTS), "MESH_TEST_AMTOOL": "/bin/false", **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_test_whose_tool_is_missing_skips_with_a_hint(tmp_path: Path) -> None:
    result = _run_suite(tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "missing tool: amtool (Alertmanager 0.28.1)" in result.stdout
    assert "python3 tests/tools.py amtool" in result.stdout


def test_a_missing_tool_fails_the_run_when_tools_are_required(tmp_path: Path) -> None:
    result = _run_suite(tmp_path, MESH_TEST_REQUIRE_TOOLS="1")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "skipped for a missing tool: test_needs_amtool.py::test_needs_amtool" in result.stdout


def test_chromium_is_a_debian_package_route_with_its_own_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tools import missing_tool_hint

    hint = missing_tool_hint("chromium")
    assert hint.startswith("missing tool: chromium")
    assert "apt-get install chromium" in hint
    assert "MESH_TEST_CHROMIUM" in hint
    broken = tmp_path / "chromium"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setenv("MESH_TEST_CHROMIUM", str(broken))
    with pytest.raises(ToolUnavailable, match=r"MESH_TEST_CHROMIUM=.* is not a working chromium"):
        find_tool("chromium")
    # none on PATH, and not allowed to install: the reason names the package
    monkeypatch.delenv("MESH_TEST_CHROMIUM")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ToolUnavailable, match="cannot install Debian's chromium"):
        find_tool("chromium", build_missing=False)
