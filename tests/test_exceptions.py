"""The error tree: what each error is, so existing httpx error handling keeps working."""

from __future__ import annotations

import inspect

import httpx
import pytest

import meshlib
from meshlib import _exceptions

REQUEST_PATH_ERRORS = [meshlib.NoHealthyEndpoints, meshlib.CircuitOpen, meshlib.DeadlineExceeded]


def test_every_error_is_in_the_drawn_tree() -> None:
    doc = _exceptions.__doc__ or ""
    for name, obj in vars(_exceptions).items():
        if inspect.isclass(obj) and issubclass(obj, meshlib.MeshError):
            assert name in doc, f"{name} is missing from the tree in _exceptions' docstring"


@pytest.mark.parametrize("error", REQUEST_PATH_ERRORS)
def test_request_path_errors_are_httpx_transport_errors_with_a_service(
    error: type[meshlib.MeshRequestError],
) -> None:
    request = httpx.Request("GET", "http://weather/v1")
    exc = error("no healthy instance of 'weather'", service="weather", request=request)
    assert isinstance(exc, httpx.TransportError)
    assert isinstance(exc, httpx.RequestError)
    assert isinstance(exc, meshlib.MeshError)
    assert exc.service == "weather"
    assert exc.request is request
    assert "weather" in str(exc)


def test_deadline_exceeded_is_an_httpx_timeout() -> None:
    assert issubclass(meshlib.DeadlineExceeded, httpx.TimeoutException)


def test_config_error_keeps_each_line() -> None:
    exc = meshlib.ConfigError(["A=1: expected b", "C=2: expected d"])
    assert exc.errors == ["A=1: expected b", "C=2: expected d"]
    assert str(exc) == "A=1: expected b\nC=2: expected d"
