"""The README a newcomer reads: short, both set-up commands on the first screen, and its Python quickstart runs as
written (offline, on the standard library's source) and prints what a relearn measured; the commands' defaults are
the ones the documentation states."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from documented import says

import hf_relearn.cli.main as cli
from hf_relearn.relearn.arguments import RelearnArguments
from hf_relearn.relearn.probe import ProbeArguments

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

    from hf_relearn.cli.main import build_parser, main

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert {"blocks", "relearn", "study", "report", "push", "card"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0, command
        assert "usage:" in capsys.readouterr().out, command


# ----------------------------------------------------------------------------- the defaults the documentation states
def test_defaults_are_what_the_readme_states(tmp_path, monkeypatch):
    args = RelearnArguments(output_dir=str(tmp_path))
    assert args.block == "decoder.-1" and says("| `--block` | `decoder.-1` |")
    assert args.eval_steps == 10 and says("| `--eval_steps` | 10 |")
    assert ProbeArguments(output_dir=str(tmp_path)).blocks == "layers,parts"
    assert says("`--blocks` takes `layers`, `parts` or any names (default `layers,parts`)")
    parser = cli.build_parser()
    assert parser.parse_args(["study", "demo"]).parallel == "data"
    assert says("`--parallel data` (default)")
    # `hf-relearn demo` runs the shipped demo recipe into relearn-demo/
    studied = []
    monkeypatch.setattr(
        cli,
        "cmd_study",
        lambda a: studied.append((a.recipe, a.output_dir, a.parallel, a.workers, a.threads_per_worker)) or 0,
    )
    assert cli.main(["demo"]) == 0
    recipe = Path(cli.__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    # 2 workers of 1 thread each: the published numbers on any machine (they depend on a run's threads)
    assert studied == [(str(recipe), "relearn-demo", "data", 2, 1)]
    assert says("2 worker processes of 1 thread each")
    assert parser.parse_args(["study", "demo"]).workers == 1 and says("`--workers N`")
    assert says("`relearn-demo/report.md`") and says("delete `relearn-demo/` to redo")
