"""The pytest plugin of ``meshlib.testing`` (registered by installing meshlib).

Fixtures:

- ``fake_mesh``: a ``FakeMesh`` whose environment is set for the test (``monkeypatch``),
  so code that builds its meshlib client during the test sends to the fakes; the fakes
  are stopped afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from . import FakeMesh, FakeService

__all__ = ["fake_mesh"]


@pytest.fixture
def fake_mesh(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeMesh]:
    """A ``FakeMesh`` whose ``env`` is set for the test as services are added."""
    mesh = _PatchedMesh(monkeypatch)
    try:
        yield mesh
    finally:
        mesh.close()


class _PatchedMesh(FakeMesh):
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self._monkeypatch = monkeypatch

    def service(self, *args: Any, **kwargs: Any) -> FakeService:
        fake = super().service(*args, **kwargs)
        for name, value in self.env.items():
            self._monkeypatch.setenv(name, value)
        return fake
