"""The shared benchmark page, docs/benchmarks.md: each benchmark owns one marked section."""

from __future__ import annotations

import re
from pathlib import Path

BENCHMARKS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(doc: Path, section: str, body: str) -> None:
    """Replace (or append) ``<!-- section:start -->...<!-- section:end -->``, keeping the
    rest of the file, so each benchmark rewrites only its own part of the page."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text if text.endswith("\n") else text + "\n")
