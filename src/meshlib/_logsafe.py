"""Text from callers made safe for a log line.

A path, a header value or a reason that quotes either comes from the network: decoded, a
path may hold a newline (``%0A``) that would end the line and forge the next one
(``INFO allowed GET /admin ...``), or terminal escape sequences. ``escaped`` writes every
control character (C0, DEL, C1, and the Unicode line and paragraph separators) and the
backslash itself as a Python escape, so a logged value is always one line and reads back
unambiguously. Printable text, non-ASCII letters included, is left as it is.
"""

from __future__ import annotations

import re

__all__ = ["escaped"]

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    return char.encode("unicode_escape").decode("ascii")


def escaped(text: object) -> str:
    """``str(text)`` with control characters and backslashes escaped (one safe line)."""
    value = str(text)
    return _UNSAFE.sub(_escape, value) if _UNSAFE.search(value) else value
