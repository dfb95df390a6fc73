"""What the project's documentation says: README.md, CONTRIBUTING.md and the docs site's own pages (docs/, without
the published results). Tests that back a documented claim read it here, wherever the page lives."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pages() -> list[Path]:
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    pages += sorted(p for p in (ROOT / "docs").rglob("*.md") if "results" not in p.relative_to(ROOT / "docs").parts)
    return pages


TEXT = "\n".join(p.read_text() for p in _pages())
_FLAT = " ".join(TEXT.split())


def says(text: str) -> bool:
    """``text`` occurs in the documentation, line breaks and runs of spaces read as one space."""
    return " ".join(text.split()) in _FLAT
