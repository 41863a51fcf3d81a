"""Find or build the programs the test suite runs as real parts: Consul, Prometheus, Alertmanager
(built with Go), and Chromium (Debian's package).

No binary is ever committed, and a fresh machine has none of them, so one function,
``find_tool(name)``, finds or provides each, in this order:

1. ``$MESH_TEST_<NAME>`` (``MESH_TEST_CONSUL``, ``MESH_TEST_PROMTOOL``, ...) - the path of a
   binary (an error if it does not run);
2. the program on ``PATH``, if it runs (and, for Consul, is a version py-consul supports,
   1.20-1.22);
3. the cache: ``${XDG_CACHE_HOME:-~/.cache}/meshlib-test/<project>-<version>/<name>``;
4. a build with the Go toolchain from the Go module proxy, into that cache.

All three projects are Go modules on the module proxy, so one recipe builds each. ``go install
module@version`` refuses a module whose go.mod has ``replace`` directives (Consul's and
Prometheus's do), and a dependency's ``replace`` and ``exclude`` lines are ignored, so a
throwaway module beside the cache entry requires the project and copies those lines from the
project's own go.mod (all but replacements by local paths, which name the project's own
submodules, required at their released versions anyway). Without them the build fails
(Prometheus 2.55 replaces ``k8s.io/klog``) or links a broken dependency (Consul excludes
go-msgpack 1.1.5). ``go build`` writes the binaries into a temporary directory and they are
renamed into place, so a killed build never leaves half a binary in the cache. A file lock
keeps concurrent test runs from building twice. ``GOTOOLCHAIN`` is left alone, so an older
``go`` (1.21 or later) fetches the toolchain a project needs by itself.

A first build takes minutes and says so: what it builds, how long it usually takes on this
kind of machine, and a progress line (modules downloaded, packages compiled) every
``PROGRESS_EVERY`` seconds instead of minutes of silence.

Chromium is no Go module: it is Debian's ``chromium`` package (``DEBIAN_TOOLS``). It is found
as ``$MESH_TEST_CHROMIUM`` or on ``PATH``; else, on a Debian machine where the tests run as
root with ``apt-get`` (a CI runner, a container), ``apt-get install -y chromium`` is run once,
said as a first-run step with its usual duration, like a first build; else the browser test
skips with a ``missing tool:`` line naming the package.

Run as a script it prints the path of each named tool (all of them by default), building
what is missing::

    python tests/tools.py                 # every tool
    python tests/tools.py consul          # one
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = [
    "DEBIAN_TOOLS",
    "TOOLS",
    "Project",
    "ToolUnavailable",
    "build",
    "cache_dir",
    "find_tool",
    "inherited_directives",
    "missing_tool_hint",
]

#: The oldest ``go`` that can fetch a newer toolchain by itself (GOTOOLCHAIN=auto).
MIN_GO = (1, 21)
#: Seconds between two progress lines of a build.
PROGRESS_EVERY = 20.0


@dataclass(frozen=True)
class Project:
    """One Go project built from the module proxy into one cache entry."""

    name: str  # shown to people, e.g. "Consul"
    slug: str  # the cache entry's prefix, e.g. "consul"
    module: str
    version: str  # the release, e.g. "1.22.5"
    module_version: str  # the module's version, e.g. "v1.22.5"
    #: binary name -> main package
    binaries: dict[str, str]
    #: the usual first build on 2 cores, said before it starts
    expected: str
    #: -ldflags for `go build` (a version stamp the release build would set)
    ldflags: str = ""
    #: Debian's packages, named in the hint when nothing can be built
    debian: str = ""

    def cache(self) -> Path:
        return cache_dir() / f"{self.slug}-{self.version}"


_PROMETHEUS_VERSION = "2.55.1"
_ALERTMANAGER_VERSION = "0.28.1"

CONSUL = Project(
    name="Consul",
    slug="consul",
    module="github.com/hashicorp/consul",
    version="1.22.5",  # py-consul 1.8 supports 1.20-1.22
    module_version="v1.22.5",
    binaries={"consul": "github.com/hashicorp/consul"},
    expected="about 5-13 minutes on 2 cores",
)
PROMETHEUS = Project(
    name="Prometheus",
    slug="prometheus",
    module="github.com/prometheus/prometheus",
    version=_PROMETHEUS_VERSION,
    module_version="v0." + _PROMETHEUS_VERSION.removeprefix("2."),  # 2.55.1 is v0.55.1
    binaries={
        "prometheus": "github.com/prometheus/prometheus/cmd/prometheus",
        "promtool": "github.com/prometheus/prometheus/cmd/promtool",
    },
    expected="about 4-8 minutes on 2 cores",
    ldflags=f"-X github.com/prometheus/common/version.Version={_PROMETHEUS_VERSION}",
    debian="prometheus",
)
ALERTMANAGER = Project(
    name="Alertmanager",
    slug="alertmanager",
    module="github.com/prometheus/alertmanager",
    version=_ALERTMANAGER_VERSION,
    module_version=f"v{_ALERTMANAGER_VERSION}",
    binaries={
        "alertmanager": "github.com/prometheus/alertmanager/cmd/alertmanager",
        "amtool": "github.com/prometheus/alertmanager/cmd/amtool",
    },
    expected="about 1-3 minutes on 2 cores",
    ldflags=f"-X github.com/prometheus/common/version.Version={_ALERTMANAGER_VERSION}",
    debian="prometheus-alertmanager",
)

#: every tool the suite runs -> the project that provides it
TOOLS: dict[str, Project] = {
    binary: project for project in (CONSUL, PROMETHEUS, ALERTMANAGER) for binary in project.binaries
}

#: tools that come from a Debian package (not built): binary -> package
DEBIAN_TOOLS: dict[str, str] = {"chromium": "chromium"}

#: versions of a ``consul`` found on PATH that are accepted as they are
CONSUL_SUPPORTED = ((1, 20), (1, 22))

_TOOLS_GO = """\
//go:build tools

// Package meshlibtools only exists so that go mod tidy keeps the project in go.mod.
package meshlibtools

import _ "{package}"
"""


class ToolUnavailable(RuntimeError):
    """No working binary could be found or built; the message says why and what to do."""


def cache_dir() -> Path:
    """The folder every built tool lives under (``.../meshlib-test``), outside any checkout."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "meshlib-test"


def missing_tool_hint(name: str) -> str:
    """One line for a test that cannot run without ``name``: how to get it."""
    if name in DEBIAN_TOOLS:
        return (
            f"missing tool: {name} (Debian's {DEBIAN_TOOLS[name]} package) - run "
            f"`apt-get install {DEBIAN_TOOLS[name]}` as root, or set MESH_TEST_{name.upper()}"
        )
    project = TOOLS[name]
    debian = f", or `apt-get install {project.debian}`" if project.debian else ""
    return (
        f"missing tool: {name} ({project.name} {project.version}) - install Go 1.21+ and run "
        f"`python3 tests/tools.py {name}`{debian}, or set MESH_TEST_{name.upper()}"
    )


def find_tool(name: str, *, build_missing: bool = True, log: bool = True) -> str:
    """The path of a working ``name`` binary, building its project into the cache if needed.

    Raises ``ToolUnavailable`` with a message that says what was tried and how to fix it.
    """
    variable = f"MESH_TEST_{name.upper()}"
    if name in DEBIAN_TOOLS:
        return _debian_tool(name, variable, install_missing=build_missing, log=log)
    project = TOOLS[name]
    explicit = os.environ.get(variable)
    if explicit:
        if _version_output(explicit) is None:
            raise ToolUnavailable(
                f"{variable}={explicit!r} is not a working {name} binary "
                f"(`{name} --version` failed); unset it to use PATH, the cache or a build"
            )
        return explicit

    on_path = shutil.which(name)
    if on_path:
        reason = _unacceptable(name, on_path)
        if reason is None:
            return on_path
        if log:
            _say(f"ignoring {on_path}: {reason}")

    cached = project.cache() / name
    if _works(cached):
        return str(cached)
    if not build_missing:
        raise ToolUnavailable(
            f"no {name} binary: {variable} is unset, none on PATH, none at {cached}"
        )
    return str(build(project, log=log) / name)


def _debian_tool(name: str, variable: str, *, install_missing: bool, log: bool) -> str:
    """``name`` from ``$MESH_TEST_<NAME>``, ``PATH``, or an ``apt-get install`` of its package."""
    explicit = os.environ.get(variable)
    if explicit:
        if _version_output(explicit) is None:
            raise ToolUnavailable(f"{variable}={explicit!r} is not a working {name} binary")
        return explicit
    on_path = shutil.which(name)
    if on_path and _version_output(on_path) is not None:
        return on_path
    package = DEBIAN_TOOLS[name]
    apt_get = shutil.which("apt-get")
    if not install_missing or apt_get is None or os.geteuid() != 0:
        why = "no apt-get" if apt_get is None else "not root" if os.geteuid() else "not asked"
        raise ToolUnavailable(
            f"no {name}: {variable} is unset and none is on PATH; cannot install Debian's "
            f"{package} here ({why})"
        )
    command = [apt_get, "install", "-y", "--no-install-recommends", package]
    if log:
        _say(
            f"first-run step: {name} is not installed; running `{' '.join(command[1:])}` "
            "(Debian's package, once per machine; about 1-3 minutes)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # stale package lists: refresh them once and try again
        if log:
            _say("apt-get install failed; running `apt-get update` and trying once more")
        subprocess.run([apt_get, "update"], env=env, capture_output=True, check=False)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = shutil.which(name)
    if done.returncode != 0 or found is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ToolUnavailable(f"`apt-get install {package}` failed: {tail[0]}")
    if log:
        _say(f"installed {package} in {_minutes(started)}: {found}")
    return found


def build(project: Project, *, log: bool = True) -> Path:
    """Build ``project``'s binaries into its cache entry and return that folder.

    Safe to call from concurrent processes: one builds, the others wait on the lock and
    then find the binaries.
    """
    go, go_version = _check_go(project)
    target = project.cache()
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "w") as lock:
        if not _try_lock(lock):
            if log:
                _say(f"waiting for another process building {project.name} in {target} ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if all(_works(target / binary) for binary in project.binaries):
            return target  # another process built it while we waited

        work = target / "build"
        work.mkdir(exist_ok=True)
        (work / "go.mod").write_text(
            f"module meshlib.invalid/{project.slug}build\n\ngo 1.21\n\n"
            f"require {project.module} {project.module_version}\n\n"
            + "".join(f"{line}\n" for line in _inherited_directives(go, project, work))
        )
        for stale in work.glob("tools*.go"):
            stale.unlink()
        for index, package in enumerate(project.binaries.values()):
            (work / f"tools{index}.go").write_text(_TOOLS_GO.format(package=package))
        build_log = target / "build.log"
        if log:
            _say(
                f"building {project.name} {project.version} with Go ({go_version}), first run "
                f"only, {project.expected}: {', '.join(project.binaries)} into {target} "
                f"(full log: {build_log})"
            )
        started = time.monotonic()
        partial = Path(tempfile.mkdtemp(prefix="partial-", dir=target))
        try:
            with open(build_log, "w") as out:
                _run_go(project, [go, "mod", "tidy"], work, out, build_log, "downloading modules")
                total = _count_packages(go, work, list(project.binaries.values()))
                argv = [go, "build", "-v", "-o", f"{partial}{os.sep}"]
                if project.ldflags:
                    argv += ["-ldflags", project.ldflags]
                argv += list(project.binaries.values())
                _run_go(project, argv, work, out, build_log, "compiling", total=total)
            for binary in project.binaries:
                if not _works(partial / binary):
                    raise ToolUnavailable(
                        f"the {binary} built at {partial} does not run `{binary} --version`; "
                        f"see {build_log}"
                    )
            for binary in project.binaries:
                os.replace(partial / binary, target / binary)  # never half a binary
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        if log:
            _say(f"built {project.name} {project.version} in {_minutes(started)}: {target}")
        return target


def _inherited_directives(go: str, project: Project, work: Path) -> list[str]:
    """The project's own ``exclude`` and ``replace`` lines, but for local-path replacements."""
    try:
        info = subprocess.run(
            [go, "mod", "download", "-json", f"{project.module}@{project.module_version}"],
            cwd=work.parent,  # not inside the throwaway module, whose go.mod may be stale
            env=_go_env(),
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout
        go_mod = Path(json.loads(info)["GoMod"]).read_text()
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        raise ToolUnavailable(
            f"cannot read the go.mod of {project.module}@{project.module_version}: {exc}"
        ) from exc
    return inherited_directives(go_mod)


def inherited_directives(go_mod: str) -> list[str]:
    """A go.mod's ``exclude`` and ``replace`` lines, one each, but for local-path replacements."""
    directives: list[str] = []
    block: str | None = None
    for raw in go_mod.splitlines():
        line = raw.split("//", 1)[0].strip()
        if block is not None:
            if line == ")":
                block = None
            elif line:
                directives.append(f"{block} {line}")
            continue
        verb, _, rest = line.partition(" ")
        if verb in ("exclude", "replace"):
            if rest.strip() == "(":
                block = verb
            else:
                directives.append(f"{verb} {rest.strip()}")
    return [
        line
        for line in directives
        if not (
            line.startswith("replace") and line.split("=>", 1)[1].strip().startswith((".", "/"))
        )
    ]


def _version_output(path: str | os.PathLike[str]) -> str | None:
    """What ``path --version`` (``consul version``) prints, or None if it does not run."""
    argv = [os.fspath(path), "version" if Path(path).name == "consul" else "--version"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout + done.stderr


def _unacceptable(name: str, path: str) -> str | None:
    """Why a binary found on PATH will not do, or None if it will."""
    out = _version_output(path)
    if out is None:
        return "it does not run"
    if name == "consul":
        match = re.search(r"Consul v(\d+)\.(\d+)\.(\d+)", out)
        found = (int(match.group(1)), int(match.group(2))) if match else None
        if found is None or not CONSUL_SUPPORTED[0] <= found <= CONSUL_SUPPORTED[1]:
            shown = out.splitlines()[0] if out else "of no known version"
            return f"it is {shown}; py-consul supports Consul 1.20-1.22"
    return None


def _works(path: Path) -> bool:
    """A cached binary runs (its folder names the version, so that is not read again)."""
    return path.is_file() and _version_output(path) is not None


def _try_lock(lock: IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _check_go(project: Project) -> tuple[str, str]:
    """The path and version of a ``go`` that can build ``project``, or ToolUnavailable."""
    go = shutil.which("go")
    if go is None:
        raise ToolUnavailable(
            f"cannot build {project.name}: the Go toolchain (`go`) is not on PATH. Install Go "
            "1.21 or later (https://go.dev/dl/, or Debian's golang-go), or point "
            f"MESH_TEST_<NAME> at a binary of {project.name} {project.version}"
        )
    try:
        out = subprocess.run(
            [go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolUnavailable(
            f"cannot build {project.name}: `go env GOVERSION` failed: {exc}"
        ) from exc
    match = re.match(r"go(\d+)\.(\d+)", out)
    if match is None or (int(match.group(1)), int(match.group(2))) < MIN_GO:
        raise ToolUnavailable(
            f"cannot build {project.name}: {go} is {out or 'of an unknown version'}; Go 1.21 "
            "or later is needed (it fetches the toolchain a project requires from the module "
            "proxy by itself unless GOTOOLCHAIN=local)"
        )
    return go, out


def _go_env() -> dict[str, str]:
    # GOWORK=off: a go.work of the caller's must not pull the throwaway module into it.
    return {**os.environ, "GOWORK": "off"}


def _count_packages(go: str, work: Path, packages: list[str]) -> int | None:
    """How many packages the build compiles at most (for the progress line), if go says."""
    try:
        out = subprocess.run(
            [go, "list", "-deps", *packages],
            cwd=work,
            env=_go_env(),
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return len(out.splitlines()) or None


def _run_go(
    project: Project,
    argv: list[str],
    cwd: Path,
    out: IO[str],
    build_log: Path,
    phase: str,
    *,
    total: int | None = None,
) -> None:
    """Run one go command, its output to the log, with a progress line now and then."""
    print("$", " ".join(argv), file=out, flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=_go_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = 0
    done = threading.Event()

    def report() -> None:
        while not done.wait(PROGRESS_EVERY):
            if phase == "downloading modules":
                count = f"{lines} modules fetched"
            else:
                count = f"{lines} of about {total} packages" if total else f"{lines} packages"
            _say(
                f"building {project.name} {project.version}: {phase}, {count}, {_minutes(started)}"
            )

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        for line in proc.stdout:
            out.write(line)
            if phase != "downloading modules" or line.startswith("go: downloading"):
                lines += 1
        proc.wait()
    finally:
        done.set()
        reporter.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out.flush()
    if proc.returncode != 0:
        tail = "\n".join(build_log.read_text(errors="replace").splitlines()[-25:])
        hint = ""
        if "GOTOOLCHAIN" in tail or "requires go >=" in tail:
            hint = (
                "\nThe local go is older than the project needs and could not switch "
                "toolchains: unset GOTOOLCHAIN (or set GOTOOLCHAIN=auto) so it can fetch one "
                "from the module proxy, or install a newer Go."
            )
        raise ToolUnavailable(
            f"building {project.name} failed: `{' '.join(argv[1:3])}` exited with "
            f"{proc.returncode} (in {cwd}; full log {build_log}):\n{tail}{hint}"
        )


def _minutes(started: float) -> str:
    seconds = int(time.monotonic() - started)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _say(message: str) -> None:
    print(f"tools: {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    """Print the path of each named tool (default: all); exit 1 with the reason if one fails."""
    names = argv or list(TOOLS)
    unknown = [name for name in names if name not in TOOLS and name not in DEBIAN_TOOLS]
    if unknown:
        print(f"tools: unknown {', '.join(unknown)}; known: {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    for name in names:
        try:
            print(find_tool(name))
        except ToolUnavailable as exc:
            print(f"tools: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
