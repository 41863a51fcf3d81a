"""Find or build the ``consul`` binary the test suite runs as a real control plane.

There is no Debian or PyPI package of Consul, and no binary is ever committed, so this
module finds one, in this order:

1. ``$MESH_TEST_CONSUL`` - the path of a binary (an error if it does not work);
2. ``consul`` on ``PATH`` (if it runs and is a version py-consul supports, 1.20-1.22);
3. the cache: ``${XDG_CACHE_HOME:-~/.cache}/meshlib-test/consul-<version>/consul``;
4. a build with the Go toolchain from the Go module proxy, into that cache.

``go install github.com/hashicorp/consul@v1.22.5`` is refused because Consul's go.mod has
``replace`` directives, so the build creates a throwaway module next to the cache entry that
requires Consul (with the same ``exclude`` lines Consul's own go.mod has, and a tools import so
``go mod tidy`` keeps the requirement), then ``go build``s the main package into a temporary
file and renames it into place: a killed build never leaves half a binary behind. A file lock
keeps two concurrent test runs from building twice. ``GOTOOLCHAIN`` is left alone, so an older
``go`` (1.21 or later) fetches the toolchain Consul needs from the module proxy by itself.

Run as a script it prints the path of a working binary, building it if needed::

    python tests/consul_binary.py
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

__all__ = ["CONSUL_VERSION", "ConsulUnavailable", "build_consul", "cache_dir", "find_consul"]

#: The Consul release the suite runs against (py-consul 1.8 supports 1.20-1.22).
CONSUL_VERSION = "1.22.5"
#: Versions of a ``consul`` found on PATH that are accepted as is.
SUPPORTED = ((1, 20), (1, 22))
#: The oldest ``go`` that can fetch a newer toolchain by itself (GOTOOLCHAIN=auto).
MIN_GO = (1, 21)

_GO_MOD = """\
module meshlib.invalid/consulbuild

go 1.21

require github.com/hashicorp/consul v{version}

// The same excludes as Consul's own go.mod: go-msgpack 1.1.5 breaks Consul's encoding.
exclude (
\tgithub.com/hashicorp/go-msgpack v1.1.5
\tgithub.com/hashicorp/go-msgpack v1.1.6
)
"""

_TOOLS_GO = """\
//go:build tools

// Package consulbuild only exists so that go mod tidy keeps Consul in go.mod.
package consulbuild

import _ "github.com/hashicorp/consul"
"""


class ConsulUnavailable(RuntimeError):
    """No working consul binary could be found or built; the message says why and what to do."""


def cache_dir(version: str = CONSUL_VERSION) -> Path:
    """The cache entry of one Consul version (``.../meshlib-test/consul-<version>``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "meshlib-test" / f"consul-{version}"


def consul_version(binary: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """The version a binary reports with ``consul version``, or None if it does not run."""
    try:
        out = subprocess.run(
            [os.fspath(binary), "version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"Consul v(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def find_consul(*, build: bool = True, log: bool = True) -> str:
    """The path of a working consul binary, building one into the cache if ``build``.

    Raises ``ConsulUnavailable`` with a message that says what was tried and how to fix it.
    """
    explicit = os.environ.get("MESH_TEST_CONSUL")
    if explicit:
        if consul_version(explicit) is None:
            raise ConsulUnavailable(
                f"MESH_TEST_CONSUL={explicit!r} is not a working consul binary "
                "(`consul version` failed); unset it to use PATH, the cache or a build"
            )
        return explicit

    on_path = shutil.which("consul")
    if on_path:
        found = consul_version(on_path)
        if found is not None and SUPPORTED[0] <= found[:2] <= SUPPORTED[1]:
            return on_path
        if log:
            shown = "does not run" if found is None else "is v{}.{}.{}".format(*found)
            _say(f"ignoring {on_path}: it {shown}; py-consul supports Consul 1.20-1.22")

    cached = cache_dir() / "consul"
    if _works(cached):
        return str(cached)
    if not build:
        raise ConsulUnavailable(
            f"no consul binary: MESH_TEST_CONSUL is unset, none on PATH, none at {cached}"
        )
    return str(build_consul(log=log))


def build_consul(version: str = CONSUL_VERSION, *, log: bool = True) -> Path:
    """Build Consul ``version`` from the Go module proxy into its cache entry; return the path.

    Safe to call from concurrent processes: one builds, the others wait on the lock and
    then find the binary.
    """
    go, go_version = _check_go()
    target_dir = cache_dir(version)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / "consul"
    with open(target_dir / ".lock", "w") as lock:
        if not _try_lock(lock):
            if log:
                _say(f"waiting for another process building Consul in {target_dir} ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _works(target, version):
            return target  # another process built it while we waited

        work = target_dir / "build"
        work.mkdir(exist_ok=True)
        (work / "go.mod").write_text(_GO_MOD.format(version=version))
        (work / "tools.go").write_text(_TOOLS_GO)
        build_log = target_dir / "build.log"
        if log:
            _say(
                f"building Consul v{version} with {go} ({go_version}) into {target} "
                f"(log: {build_log}); the first build downloads and compiles a few hundred "
                "modules and takes several minutes"
            )
        started = time.monotonic()
        partial = target_dir / f"consul.partial-{os.getpid()}"
        try:
            with open(build_log, "w") as out:
                _run_go([go, "mod", "tidy"], work, out, build_log)
                _run_go(
                    [go, "build", "-o", str(partial), "github.com/hashicorp/consul"],
                    work,
                    out,
                    build_log,
                )
            if not _works(partial, version):
                raise ConsulUnavailable(
                    f"the Consul built at {partial} does not report v{version} "
                    f"from `consul version`; see {build_log}"
                )
            os.replace(partial, target)  # atomic: the cache never holds half a binary
        finally:
            partial.unlink(missing_ok=True)
        if log:
            _say(f"built Consul v{version} in {time.monotonic() - started:.0f} s: {target}")
        return target


def _works(path: Path, version: str = CONSUL_VERSION) -> bool:
    found = consul_version(path) if path.is_file() else None
    return found is not None and ".".join(map(str, found)) == version


def _try_lock(lock: IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _check_go() -> tuple[str, str]:
    """The path and version of a ``go`` that can build Consul, or ConsulUnavailable."""
    go = shutil.which("go")
    if go is None:
        raise ConsulUnavailable(
            "cannot build Consul: the Go toolchain (`go`) is not on PATH. Install Go 1.21 or "
            "later (https://go.dev/dl/), or point MESH_TEST_CONSUL at a consul binary "
            f"(v{CONSUL_VERSION}, or any 1.20-1.22), or put one on PATH"
        )
    try:
        out = subprocess.run(
            [go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConsulUnavailable(f"cannot build Consul: `{go} env GOVERSION` failed: {exc}") from exc
    match = re.match(r"go(\d+)\.(\d+)", out)
    if match is None or (int(match.group(1)), int(match.group(2))) < MIN_GO:
        raise ConsulUnavailable(
            f"cannot build Consul: {go} is {out or 'of an unknown version'}; Go 1.21 or later is "
            "needed (it fetches the toolchain Consul requires from the module proxy by itself "
            "unless GOTOOLCHAIN=local). Upgrade Go, or set MESH_TEST_CONSUL"
        )
    return go, out


def _run_go(argv: list[str], cwd: Path, out: IO[str], build_log: Path) -> None:
    print("$", " ".join(argv), file=out, flush=True)
    # GOWORK=off: a go.work of the caller's must not pull this throwaway module into it.
    env = {**os.environ, "GOWORK": "off"}
    proc = subprocess.run(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "\n".join(build_log.read_text(errors="replace").splitlines()[-25:])
        hint = ""
        if "GOTOOLCHAIN" in tail or "requires go >=" in tail:
            hint = (
                "\nThe local go is older than Consul needs and could not switch toolchains: "
                "unset GOTOOLCHAIN (or set GOTOOLCHAIN=auto) so it can fetch one from the "
                "module proxy, or install a newer Go."
            )
        raise ConsulUnavailable(
            f"building Consul failed: `{' '.join(argv[1:3])}` exited with {proc.returncode} "
            f"(in {cwd}; full log {build_log}):\n{tail}{hint}"
        )


def _say(message: str) -> None:
    print(f"consul_binary: {message}", file=sys.stderr, flush=True)


def main() -> int:
    """Print the path of a working consul binary; exit 1 with the reason if there is none."""
    try:
        print(find_consul())
    except ConsulUnavailable as exc:
        print(f"consul_binary: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
