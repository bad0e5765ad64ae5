"""The project's documentation as text: README.md, launch/README.md and the pages of docs/ (what the tests about
the docs read)."""

from __future__ import annotations

import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"


def pages() -> dict[pathlib.Path, str]:
    """{path: text} of README.md, launch/README.md and every docs/**/*.md, in a fixed order."""
    paths = [README, REPO / "launch" / "README.md", *sorted(DOCS.rglob("*.md"))]
    return {path: path.read_text(encoding="utf-8") for path in paths}


def all_text() -> str:
    return "\n".join(pages().values())
