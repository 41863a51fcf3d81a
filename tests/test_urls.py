"""The fast URL rewrite gives exactly what httpx's own copy_with gives."""

from __future__ import annotations

import httpx
import pytest

from meshlib import _urls


@pytest.mark.parametrize(
    "url",
    [
        "http://weather/v1/forecast?city=Oslo&days=3",
        "http://weather:8080/",
        "https://user:pw@weather/a%20b?x=%2F#frag",
        "http://weather.service.consul/path/with/%C3%A6",
        "http://weather",
    ],
)
@pytest.mark.parametrize(
    ("host", "port"),
    [("127.0.0.1", 8001), ("::1", 9000), ("Backend-1.internal", 80), ("10.0.0.7", 443)],
)
def test_fast_rewrite_equals_copy_with(url: str, host: str, port: int) -> None:
    original = httpx.URL(url)
    fast = _urls._fast(original, host, port)
    slow = _urls._slow(original, host, port)
    assert fast == slow
    assert str(fast) == str(slow)
    assert (fast.host, fast.port, fast.raw_path) == (slow.host, slow.port, slow.raw_path)
    assert original == httpx.URL(url)  # the caller's URL is untouched


def test_the_fast_path_is_in_use() -> None:
    assert _urls.with_endpoint is _urls._fast
