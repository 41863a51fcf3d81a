"""The public surface changes only on purpose."""

from __future__ import annotations

import meshlib

PUBLIC = [
    "ASGIMiddleware",
    "AsyncClient",
    "AsyncMeshTransport",
    "CircuitOpen",
    "Client",
    "ConfigError",
    "DeadlineExceeded",
    "EgressDenied",
    "IdentityMismatch",
    "Mesh",
    "MeshError",
    "MeshRequestError",
    "MeshTransport",
    "NoHealthyEndpoints",
    "RequestFailed",
    "SpiffeId",
    "UntrustedCertificate",
    "WSGIMiddleware",
    "__version__",
    "peer_identity",
]


def test_all_is_exactly_the_public_api() -> None:
    assert meshlib.__all__ == PUBLIC, "the public API changed: update PUBLIC and the CHANGELOG"


def test_all_is_sorted_and_every_name_exists() -> None:
    assert meshlib.__all__ == sorted(meshlib.__all__)
    for name in meshlib.__all__:
        assert hasattr(meshlib, name), name


def test_public_names_are_defined_in_meshlib() -> None:
    for name in meshlib.__all__:
        member = getattr(meshlib, name)
        if hasattr(member, "__module__"):
            assert member.__module__.startswith("meshlib"), name


def test_public_classes_and_functions_have_docstrings() -> None:
    for name in meshlib.__all__:
        member = getattr(meshlib, name)
        if callable(member):
            assert member.__doc__, f"meshlib.{name} has no docstring"


def test_meshlib_testing_exports_exactly_its_api() -> None:
    import meshlib.testing

    assert meshlib.testing.__all__ == [
        "Answer",
        "FakeMesh",
        "FakeService",
        "Received",
        "pinned_peer",
    ]
