"""MkDocs hook: fill ``<!-- card-variables:NAME -->`` with the variables the shipped template ``cards/NAME.md`` uses.

Read at build time from the template itself (Jinja2's own parser), so the list a user's ``--card-template`` can
rely on is always the shipped template's.
"""

from __future__ import annotations

import re
from pathlib import Path

CARDS = Path(__file__).resolve().parents[2] / "cards"
MARKER = re.compile(r"<!-- card-variables:([\w-]+) -->")


def card_variables(name: str) -> list[str]:
    """The undeclared variables of ``cards/NAME.md``, sorted (``card_data`` is the card's YAML metadata)."""
    from jinja2 import Environment, meta

    source = (CARDS / f"{name}.md").read_text()
    return sorted(meta.find_undeclared_variables(Environment().parse(source)))


def on_page_markdown(markdown: str, page, config, files) -> str:
    def listing(match: re.Match) -> str:
        return ", ".join(f"`{v}`" for v in card_variables(match.group(1)))

    return MARKER.sub(listing, markdown)
