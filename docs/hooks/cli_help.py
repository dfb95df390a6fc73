"""MkDocs hook: fill ``<!-- cli-help -->`` in a page with the ``--help`` of ``hf-relearn`` and of every subcommand.

The text is generated at build time from the parser ``hf_relearn.cli.main.build_parser()`` builds, so the reference can
never drift from the code. Subcommands are read off that parser (a new one appears without touching this file);
those ``hf_relearn.cli.runs.HF_COMMANDS`` parses with ``HfArgumentParser`` (every ``TrainingArguments`` flag) are
asked for their help the way ``hf-relearn NAME --help`` asks: by running the command's own parser with ``--help``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import re
import sys
from pathlib import Path

MARKER = "<!-- cli-help -->"
WIDTH = "100"  # argparse wraps help text to $COLUMNS: fixed, so the page is the same on every machine


log = logging.getLogger("mkdocs.hooks.cli_help")


def _printed(call) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        call()
    return out.getvalue().rstrip()


@contextlib.contextmanager
def _literal_percent_signs():
    """argparse %-formats every help string; a lone ``%`` in one ("150% of its steps") makes ``--help`` raise.
    Within this block such a sign is printed as itself, which is what the help string means."""
    expand = argparse.HelpFormatter._expand_help

    def tolerant(self, action):
        try:
            return expand(self, action)
        except (TypeError, ValueError, KeyError):
            literal = copy.copy(action)
            literal.help = re.sub(r"%(?![(%])", "%%", action.help or "")
            return expand(self, literal)

    argparse.HelpFormatter._expand_help = tolerant
    try:
        yield
    finally:
        argparse.HelpFormatter._expand_help = expand


def _help_of(name: str, call) -> str:
    """What ``call()`` prints before it exits (argparse's ``--help`` ends with ``SystemExit(0)``)."""
    try:
        return _printed(call)
    except (TypeError, ValueError, KeyError) as err:
        # the command's own --help fails on a help string; show the text it is meant to print, and say so in the log
        log.info(
            "hf-relearn %s --help raised %s: %s; rendered with lone %% signs taken literally",
            name,
            type(err).__name__,
            err,
        )
        with _literal_percent_signs():
            return _printed(call)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_help() -> str:
    """Markdown: one section per command, its help in a text block."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        root = Path(__file__).resolve().parents[2]
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from hf_relearn.cli.main import build_parser
        from hf_relearn.cli.runs import HF_COMMANDS

        parser = build_parser()
        sections = [("hf-relearn", parser.format_help().rstrip())]
        for name, sub in _subparsers(parser).items():
            if name in HF_COMMANDS:
                text = _help_of(name, lambda name=name: HF_COMMANDS[name](["--help"]))
            else:
                text = sub.format_help().rstrip()
            sections.append((f"hf-relearn {name}", text))
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    parts = []
    for title, text in sections:
        parts.append(f"## `{title}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_help())
