"""Rollouts without Consul: the embedded default's local config file as the control plane.

``FilePlane`` is a ``ControlPlane`` (``_plane``) over ``MESH_CONFIG_FILE``
(routing/_local.py): the controller rewrites the file's ``service-splitter`` (and, for A/B,
one route of its ``service-router``), the same entries it writes to Consul, and every
process reading the file picks the change up within its check interval (0.5 s). The
operator's ``service-resolver`` names the subsets; the file's ``services`` list the
instances, and an instance's ``meta`` ``admin-port`` says where its ``/mesh/metrics`` is
(as ``meshlib serve`` registers it in Consul), so the metrics can be scraped without
Prometheus (``_scrape``).

Beside the file, in ``<file>.rollouts/``:

* ``<service>.json``: the rollout's state, ``{"index": n, "state": {...}}``; a save is a
  check-and-set on ``index`` under an ``flock`` of ``<service>.json.lck``, so a stale
  write fails as Consul's CAS does, and the file is replaced atomically (``os.replace``);
* ``<service>.lock``: the controller lock, an exclusive ``flock`` held for the
  controller's life. The kernel drops it when the process dies, ``kill -9`` included, so a
  restarted controller takes over at once; the file names the holder (pid, host, since).

A rewrite of the config file is checked (``routing._local.parse``) before it replaces the
file, so the controller never writes a file the processes would refuse, and it is made only
if the file is still what the controller read (an operator's edit meanwhile is re-read and
kept). The file is rewritten as indented JSON: its formatting is not kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..routing._filter import EndpointView, compile_filter
from ..routing._local import parse
from ._consul import RolloutError
from ._consul_entries import MANAGED_BY, Match, Resolver
from ._lock import Holder
from ._state import RolloutState

__all__ = ["FileLock", "FilePlane", "FileStateStore"]

#: How often ``FileStateStore.wait`` looks for a change (a stat; no inotify needed).
POLL = 0.1
_ATTEMPTS = 10


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step (a reader sees the old or the new file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if need be) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


class FileStateStore:
    """One service's rollout state in ``<file>.rollouts/<service>.json``, with CAS."""

    def __init__(self, folder: Path, service: str) -> None:
        self.path = folder / f"{_safe(service)}.json"
        self._guard = folder / f"{_safe(service)}.json.lck"

    def load(self) -> tuple[RolloutState | None, int]:
        """``(state or None, index)``; index 0 when there is none yet."""
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None, 0
        except (OSError, ValueError) as exc:
            raise RolloutError(f"cannot read the rollout state {self.path}: {exc}") from None
        return RolloutState.from_json(document["state"]), int(document["index"])

    def wait(self, index: int, timeout: float) -> tuple[RolloutState | None, int]:
        """Like ``load``, but returns early only when the state changes after ``index``."""
        deadline = time.monotonic() + timeout
        while True:
            state, current = self.load()
            left = deadline - time.monotonic()
            if current != index or left <= 0:
                return state, current
            time.sleep(min(POLL, left))  # the poll period: a stat and a small read

    def save(self, state: RolloutState, cas: int) -> bool:
        """Write ``state`` if the state is still at ``cas`` (0: does not exist yet)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _flocked(self._guard):
            _, current = self.load()
            if current != cas:
                return False
            document = {"index": current + 1, "state": state.to_json()}
            _write_atomically(self.path, json.dumps(document, indent=1) + "\n")
        return True

    def delete(self) -> None:
        """Forget the rollout (tests and cleanup)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class FileLock:
    """The controller lock: an exclusive ``flock`` on ``<file>.rollouts/<service>.lock``."""

    def __init__(self, folder: Path, service: str) -> None:
        self.path = folder / f"{_safe(service)}.lock"
        #: never set: the kernel holds an ``flock`` for as long as its holder lives
        self.lost = threading.Event()
        self._fd: int | None = None

    def holder(self) -> Holder | None:
        """The current holder, or None when the lock is free."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._describe()
            return None  # nobody holds it (our shared lock goes with the close)
        finally:
            os.close(fd)

    def acquire(self) -> Holder | None:
        """Take the lock; on failure return who holds it (and take nothing)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self._describe() or Holder()
        value = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, value.encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        """Give the lock up (closing the file drops the ``flock``)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

    def _describe(self) -> Holder | None:
        try:
            value = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            value = {}
        return Holder(value if isinstance(value, dict) else {})


class FilePlane:
    """``ControlPlane`` over the local config file (``MESH_CONFIG_FILE``)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.where = f"the file {path}"
        self.folder = Path(f"{path}.rollouts")

    # ------------------------------------------------------------------- reading

    def _document(self) -> tuple[dict[str, Any], str]:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise RolloutError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            parse(text)
        except ValueError as exc:
            raise RolloutError(f"{self.path}: {exc}") from None
        return json.loads(text), text

    def _entry(self, document: dict[str, Any], kind: str, service: str) -> dict[str, Any] | None:
        for entry in document.get("config_entries") or ():
            if entry.get("Kind") == kind and entry.get("Name") == service:
                return dict(entry)
        return None

    def resolver(self, service: str) -> Resolver:
        """See ``ControlPlane``."""
        document, _ = self._document()
        entry = self._entry(document, "service-resolver", service)
        if entry is None:
            raise RolloutError(
                f"no service-resolver {service!r} in {self.where}: add one to its "
                "config_entries whose Subsets select the stable and the canary version "
                "(docs/rollouts.md)"
            )
        subsets = {
            str(name): str((body or {}).get("Filter") or "")
            for name, body in (entry.get("Subsets") or {}).items()
        }
        return Resolver(service, subsets, str(entry.get("DefaultSubset") or ""))

    def split(self, service: str) -> dict[str, int] | None:
        """See ``ControlPlane``."""
        document, _ = self._document()
        entry = self._entry(document, "service-splitter", service)
        if entry is None:
            return None
        weights: dict[str, int] = {}
        for split in entry.get("Splits") or ():
            if split.get("Service", service) in ("", service):
                subset = str(split.get("ServiceSubset") or "")
                weights[subset] = weights.get(subset, 0) + round(float(split.get("Weight", 0)))
        return weights

    def instances(self, resolver: Resolver, subset: str) -> list[str]:
        """Each listed instance the subset selects, as ``host:admin-port`` (its metrics).

        Without ``meta.admin-port`` an instance's own port is given, as for Consul; its
        app port answers ``/mesh/metrics`` with 404, which the scrape reports.
        """
        document, _ = self._document()
        text = resolver.subsets.get(subset) or ""
        predicate = compile_filter(text) if text else None
        found = []
        for item in (document.get("services") or {}).get(resolver.service) or ():
            host, _, port = str(item["address"]).rpartition(":")
            meta = {str(k): str(v) for k, v in (item.get("meta") or {}).items()}
            tags = tuple(str(t) for t in item.get("tags") or ())
            view = EndpointView(
                resolver.service,
                str(item.get("id") or item["address"]),
                host,
                int(port),
                "",
                meta,
                tags,
            )
            if predicate is None or predicate(view):
                found.append(f"{host}:{meta.get('admin-port') or port}")
        return sorted(found)

    # ------------------------------------------------------------------- writing

    def _rewrite(self, change: Callable[[dict[str, Any]], bool]) -> None:
        """Apply ``change`` to the file's document (it returns False for no change),
        check the result parses, and replace the file if it still is what was read."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):
            with _flocked(self.folder / ".config.lck"):  # one rewrite at a time
                document, text = self._document()
                if not change(document):
                    return
                new = json.dumps(document, indent=2) + "\n"
                try:
                    parse(new)
                except ValueError as exc:
                    raise RolloutError(f"{self.path} would not be valid: {exc}") from None
                if self.path.read_text() != text:
                    continue  # edited meanwhile: read it again, keep that edit
                _write_atomically(self.path, new)
                return
        raise RolloutError(f"{self.path} keeps changing under the controller")

    def _put(self, document: dict[str, Any], entry: dict[str, Any]) -> bool:
        entries: list[dict[str, Any]] = list(document.get("config_entries") or [])
        for i, old in enumerate(entries):
            if old.get("Kind") == entry["Kind"] and old.get("Name") == entry["Name"]:
                if old == entry:
                    return False
                entries[i] = entry
                break
        else:
            entries.append(entry)
        document["config_entries"] = entries
        return True

    def write_split(self, service: str, stable: str, canary: str, weight: int) -> None:
        """See ``ControlPlane``."""
        entry = {
            "Kind": "service-splitter",
            "Name": service,
            "Meta": MANAGED_BY,
            "Splits": [
                {"Weight": 100 - weight, "ServiceSubset": stable},
                {"Weight": weight, "ServiceSubset": canary},
            ],
        }
        self._rewrite(lambda document: self._put(document, entry))

    def write_route(self, service: str, canary: str, match: Match) -> None:
        """See ``ControlPlane``."""
        route = {"Match": match.consul(), "Destination": {"ServiceSubset": canary}}

        def change(document: dict[str, Any]) -> bool:
            current = self._entry(document, "service-router", service) or {}
            others = [r for r in current.get("Routes") or () if r.get("Match") != route["Match"]]
            entry = {
                "Kind": "service-router",
                "Name": service,
                "Meta": current.get("Meta") or MANAGED_BY,
                "Routes": [route, *others],
            }
            return self._put(document, entry)

        self._rewrite(change)

    def remove_route(self, service: str, match: Match) -> None:
        """See ``ControlPlane``."""

        def change(document: dict[str, Any]) -> bool:
            current = self._entry(document, "service-router", service)
            if current is None:
                return False
            routes = [r for r in current.get("Routes") or () if r.get("Match") != match.consul()]
            if routes == list(current.get("Routes") or ()):
                return False
            if not routes and current.get("Meta") == MANAGED_BY:
                document["config_entries"] = [
                    e
                    for e in document.get("config_entries") or ()
                    if not (e.get("Kind") == "service-router" and e.get("Name") == service)
                ]
                return True
            return self._put(document, {**current, "Routes": routes})

        self._rewrite(change)

    # ------------------------------------------------------------------- state, lock

    def store(self, service: str) -> FileStateStore:
        """See ``ControlPlane``."""
        return FileStateStore(self.folder, service)

    def lock(self, service: str) -> FileLock:
        """See ``ControlPlane``."""
        return FileLock(self.folder, service)


def _safe(service: str) -> str:
    """A service name as a file name (service names are DNS labels; be safe anyway)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in service)
