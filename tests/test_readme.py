"""The README a newcomer reads: short, both set-up commands on the first screen, and its Python quickstart runs as
written (offline, on the standard library's source) and prints what a relearn measured."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(marker: str, language: str) -> str:
    section = README.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_readme_is_short_and_starts_with_both_commands():
    assert len(README.encode()) < 12_000, f"README.md is {len(README.encode())} bytes"
    first_screen = "\n".join(README.splitlines()[:40])
    for marker in ("main-command", "test-command"):
        assert f"<!-- /{marker} -->" in first_screen, f"{marker} is not on the first screen"
    assert "hf-relearn demo" in _block("main-command", "bash")
    assert "pytest" in _block("test-command", "bash") and "mkdocs build --strict" in _block("test-command", "bash")
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", README), "a dated timing or result in the README"


def test_the_release_files_exist():
    for name in ("LICENSE", "CONTRIBUTING.md", "CHANGELOG.md", "cards/relearn.md", "cards/study.md", "mkdocs.yml"):
        assert (ROOT / name).is_file(), name
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and re.search(r"^## \[0\.1\.0\] - \d{4}-\d\d-\d\d$", changelog, re.M)


def test_the_python_quickstart_runs_as_written(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(_block("quickstart", "python"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    recovered, steps, fraction = run.stdout.strip().splitlines()[-1].split()
    assert recovered in ("True", "False")
    if recovered == "True":  # steps and their share of the 600-step budget agree
        assert float(fraction) == int(steps) / 600
    assert (tmp_path / "runs" / "relearn" / "relearn_result.json").is_file()


def test_every_command_prints_its_help(capsys):
    """`hf-relearn CMD --help` renders for every command (a stray % in a help text once crashed `relearn --help`)."""
    import pytest

    from hf_relearn.cli import build_parser, main

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert {"blocks", "relearn", "study", "report", "push", "card"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0, command
        assert "usage:" in capsys.readouterr().out, command
