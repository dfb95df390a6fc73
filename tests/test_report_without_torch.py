"""``hf-relearn report DIR`` works where torch and transformers cannot be imported (report, findings, study_plots)."""

import shutil
import subprocess
import sys
from pathlib import Path

from pngs import assert_plot

PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "results" / "tinyshakespeare-gpt2"

# runs in a fresh interpreter: every import of torch or transformers (and their submodules) raises ImportError
NO_TORCH = """
import sys


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, _Blocked())
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("the blocker let torch through")

from hf_relearn.cli.main import main

code = main(["report", sys.argv[1]])
assert "torch" not in sys.modules and "transformers" not in sys.modules
sys.exit(code)
"""


def _table(report: str) -> str:
    """The report's "## Table" section (its caption and the markdown table)."""
    return report.split("## Table", 1)[1].split("## Plots", 1)[0]


def test_report_rebuilds_a_published_study_without_torch(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    for name in ("results.csv", "recipe.yaml"):
        shutil.copy(PUBLISHED / name, study / name)

    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(study)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    report = (study / "report.md").read_text()
    # one grid point, 4 blocks x 2 arms: each plot at its figure size, with its data drawn in colour across it
    for png, inches in {"curves.png": (6.5, 4.5), "cost_vs_layer.png": (7, 4.5), "arms.png": (6, 4.5)}.items():
        assert_plot(study / "plots" / png, inches)
        assert f"plots/{png}" in report
    # the study's table, as published: decoder.1 re-learned alone in 350 ± 99 steps (23.3% of the 1500-step budget)
    row = "| base | decoder.1 | block | 5.26 ± 0.44% | 350 ± 99 | 23.3 ± 6.6% | 716800 ± 202742 | 2/2 | 1400 |"
    assert row in report
    assert _table(report) == _table((PUBLISHED / "report.md").read_text())
    assert "decoder.1" in done.stdout and "report:" in done.stdout  # the terminal table and the report's path
