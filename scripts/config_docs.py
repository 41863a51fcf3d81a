"""Regenerate the variable tables in docs/configuration.md from meshlib._config.VARIABLES.

The tables sit between ``<!-- table:OWNER -->`` and ``<!-- /table:OWNER -->`` markers;
everything else in the page is prose written by hand. tests/test_config.py fails when a
table is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from meshlib._config import markdown_table

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def main() -> int:
    """Rewrite the tables in place; returns the exit status."""
    text = PAGE.read_text()
    for owner in ("meshlib", "consul", "otel"):
        pattern = re.compile(rf"(<!-- table:{owner} -->\n).*?(<!-- /table:{owner} -->)", re.S)
        if not pattern.search(text):
            print(f"{PAGE}: no <!-- table:{owner} --> markers", file=sys.stderr)
            return 1
        text = pattern.sub(lambda m: m.group(1) + markdown_table(owner) + m.group(2), text)  # noqa: B023
    PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
