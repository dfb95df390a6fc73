"""A study SIGKILLed at chosen points (a base's checkpoint, its end, a relearn, before the results.csv rewrite, the
report) and run again ends with the table and report of an uninterrupted run.

The kill comes from a wrapper script that patches one function to SIGKILL its own process the first time it is
reached (a marker file keeps the resumed run alive), then runs the CLI: no hook in the production code.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_study import TINY_RECIPE, _write_recipe

from hf_relearn.cli.main import main
from hf_relearn.storage import read_results
from hf_relearn.study.run import _resume_point

# one base (checkpoints every 20 of its 60 steps) and two runs of 15 steps each (no stop at recovery, so every
# relearn trains): about 5 s a study on one thread
RECIPE = {
    **TINY_RECIPE,
    "base": {**TINY_RECIPE["base"], "config_overrides": {**TINY_RECIPE["base"]["config_overrides"], "n_layer": 2}},
    "pretrain": {**TINY_RECIPE["pretrain"], "max_steps": 60, "eval_steps": 20, "save_strategy": "steps", "save_steps": 20},
    "sweep": {"blocks": "all_layers", "trainable": ["block"], "seeds": [0]},
    "relearn": {**TINY_RECIPE["relearn"], "max_steps": 15, "stop_at_recovery": False},
}  # fmt: skip

KILLER = """
import os, signal, sys
from pathlib import Path

point, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
study = Path(argv[argv.index("--output-dir") + 1])


def kill():
    if not marker.exists():  # the first time only: the resumed run goes through
        marker.write_text(point)
        os.kill(os.getpid(), signal.SIGKILL)


def patch(owner, name, when, after=False):
    original = getattr(owner, name)

    def patched(*args, **kwargs):
        if not after and when(*args, **kwargs):
            kill()
        out = original(*args, **kwargs)
        if after and when(*args, **kwargs):
            kill()
        return out

    setattr(owner, name, patched)


import transformers
import hf_relearn.report.build
import hf_relearn.study.run
from hf_relearn.relearn.trainer import RelearnTrainer


def base(trainer):
    return "bases" in Path(trainer.args.output_dir).parts


if point == "base-checkpoint":  # the base's first checkpoint complete, its training going on
    patch(transformers.Trainer, "_save_checkpoint", lambda self, *a, **k: base(self), after=True)
elif point == "base-end":  # the base's last checkpoint written, its hf_relearn_run.json not yet
    patch(transformers.Trainer, "_save_checkpoint",
          lambda self, *a, **k: base(self) and self.control.should_training_stop, after=True)
elif point == "relearn":  # step 3 of the second relearn (the first one's row is in results.csv)
    patch(RelearnTrainer, "training_step",
          lambda self, *a, **k: self.state.global_step == 2 and (study / "results.csv").exists())
elif point == "results-csv":  # the second run's result written, results.csv not rewritten yet
    patch(hf_relearn.study.run, "write_results", lambda path, rows: Path(path).exists())
elif point == "report":  # the plots drawn, report.md not written yet
    patch(hf_relearn.report.build, "make_plots", lambda *a, **k: True, after=True)
else:
    raise SystemExit(f"unknown kill point {point}")

from hf_relearn.cli.main import main

sys.exit(main(argv))
"""


def _rows(study: Path) -> list[dict]:
    """results.csv without the base model's path (the one column that names the study's folder)."""
    rows = read_results(study / "results.csv")
    assert all(r["model"] == str(study / "bases" / r["base_id"]) for r in rows)
    return [{k: v for k, v in r.items() if k != "model"} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted study, shared by every kill point."""
    root = tmp_path_factory.mktemp("resume")
    out = root / "whole"
    recipe = _write_recipe(root / "tiny.yaml", RECIPE)
    assert main(["study", str(recipe), "--output-dir", str(out), "--no-progress"]) == 0
    assert [r["block"] for r in read_results(out / "results.csv")] == ["decoder.0", "decoder.1"]
    return out


def _killed_state(out: Path, point: str) -> None:
    """What the kill left behind: proof that it landed where it was aimed."""
    base = out / "bases" / "seed0"
    finished = sorted(p.parent.name for p in out.glob("runs/seed0/*/relearn_result.json"))
    rows = read_results(out / "results.csv") if (out / "results.csv").exists() else []
    if point in ("base-checkpoint", "base-end"):
        last = "checkpoint-20" if point == "base-checkpoint" else "checkpoint-60"
        assert (base / last / "trainer_state.json").exists() and not (base / "hf_relearn_run.json").exists()
        assert not (out / "runs").exists() and not rows
    elif point == "relearn":  # the top layer first (study.py orders the runs for the prefix cache)
        assert finished == ["decoder.1-scratch-block-r0"] and len(rows) == 1
        assert (out / "runs" / "seed0" / "decoder.0-scratch-block-r0").is_dir()
    elif point == "results-csv":
        assert len(finished) == 2 and [r["block"] for r in rows] == ["decoder.1"]
    else:
        assert len(rows) == 2 and (out / "plots" / "curves.png").exists() and not (out / "report.md").exists()


@pytest.mark.parametrize("point", ["base-checkpoint", "base-end", "relearn", "results-csv", "report"])
def test_a_study_killed_at_a_chosen_point_resumes_to_the_same_table(reference, tmp_path, point):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    recipe = _write_recipe(tmp_path / "tiny.yaml", RECIPE)
    out, marker = tmp_path / "killed", tmp_path / "killed.marker"
    cmd = [sys.executable, str(killer), point, str(marker), "study", str(recipe), "--output-dir", str(out)]
    cmd.append("--no-progress")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL and marker.read_text() == point, first.stderr[-3000:]
    _killed_state(out, point)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _rows(out) == _rows(reference)  # the same runs, the same numbers, once each
    assert (out / "report.md").read_text() == (reference / "report.md").read_text()
    plots = sorted(p.name for p in (reference / "plots").iterdir())
    assert sorted(p.name for p in (out / "plots").iterdir()) == plots and "curves.png" in plots
    for csv in (name for name in plots if name.endswith(".csv")):  # the numbers behind a plot, where it has them
        assert (out / "plots" / csv).read_text() == (reference / "plots" / csv).read_text()
    base_run = json.loads((out / "bases" / "seed0" / "hf_relearn_run.json").read_text())
    assert base_run["steps"] == 60 and [s for s, _ in base_run["curve"]] == [20, 40, 60]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))


def _checkpoint(folder: Path, step: int, max_steps: int = 300, stop: bool = False, complete: bool = True) -> None:
    (folder / f"checkpoint-{step}").mkdir(parents=True)
    if complete:
        control = {"TrainerControl": {"args": {"should_training_stop": stop}, "attributes": {}}}
        state = {"global_step": step, "max_steps": max_steps, "stateful_callbacks": control}
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))


def test_a_base_resumes_from_its_last_checkpoint_saved_before_the_training_ended(tmp_path):
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 30, complete=False)  # killed while saving: no trainer_state.json
    assert _resume_point(tmp_path) == tmp_path / "checkpoint-20"
    _checkpoint(tmp_path, 40, stop=True)  # converged there: the Trainer would go on past it
    assert _resume_point(tmp_path) == tmp_path / "checkpoint-20" and not (tmp_path / "checkpoint-40").exists()
    _checkpoint(tmp_path / "b", 60, max_steps=60)  # the last step (should_training_stop not recorded)
    assert _resume_point(tmp_path / "b") is None and not (tmp_path / "b" / "checkpoint-60").exists()
    assert _resume_point(tmp_path / "none") is None
