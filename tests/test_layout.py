"""The package's shape: imports point one way (bottom to top), no cycles, modules and functions stay small, the
card templates (cards/) and recipes ship in the wheel as real files, and one relearn run builds one BlockMap."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_relearn"

# each module's layer; a module may import only from its own layer or below (and never in a cycle)
LAYERS: dict[str, int] = {
    # 0: names, errors, files on disk (no torch)
    "errors": 0, "storage": 0, "grid": 0, "arm_registry": 0, "caveats": 0, "stats": 0, "survival": 0,
    # 1: models, block names, data
    "objectives": 1, "modeling": 1, "sharding": 1, "blocks": 1, "data": 1, "tokenizers": 1, "tokenization": 1, "corpora": 1, "texts": 1, "collators": 1,
    # 2: what is done to a model: surgery, swaps, the frozen-prefix plan and cache
    "surgery": 2, "swap": 2, "prefix_plan": 2, "prefix_cache": 2,
    # 3: arguments, results, callbacks, metrics, arms; cards and plots (values in, files out)
    "config": 3, "result": 3, "callbacks": 3, "metrics": 3, "arms": 3, "cards": 3, "plots": 3, "original_curve": 3,
    # 4: the trainer
    "trainer_prefix": 4, "trainer": 4,
    # 5: the runs a user starts, and the Hub
    "runner": 5, "probe": 5, "hub": 5,
    # 6: studies and their reports
    "plan": 6, "recipe": 6, "workers": 6, "study_rows": 6, "study": 6, "findings": 6, "grid_findings": 6, "swap_findings": 6, "study_plots": 6, "report": 6,
    # 7: the command line
    "cli_runs": 7, "cli": 7, "__main__": 7,
    # the package facade: re-exports public names lazily from every layer
    "__init__": 8,
}  # fmt: skip
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def _package_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                out.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                out.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("hf_relearn."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("hf_relearn."))
    return out


def test_every_module_has_a_layer():
    missing = sorted(set(_modules()) - set(LAYERS))
    assert not missing, f"give these modules a layer in tests/test_layout.py: {missing}"


def test_imports_point_down_only():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for dep in _package_imports(path):
            if dep in modules and LAYERS[dep] > LAYERS[name]:
                upward.append(f"{name} (layer {LAYERS[name]}) imports {dep} (layer {LAYERS[dep]})")
    assert not upward, "imports must point down:\n" + "\n".join(upward)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {d for d in _package_imports(path) if d in modules and d != name} for name, path in modules.items()}
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(node) :] + [node]))
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, [*trail, node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    # two modules importing each other must be caught (so the test above is not vacuous)
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    monkeypatch.setitem(LAYERS, "a", 1)
    monkeypatch.setitem(LAYERS, "b", 1)
    with pytest.raises(AssertionError, match="import cycle: a -> b -> a"):
        test_no_import_cycles()
    monkeypatch.setitem(LAYERS, "b", 0)
    with pytest.raises(AssertionError, match="b \\(layer 0\\) imports a \\(layer 1\\)"):
        test_imports_point_down_only()


def test_modules_and_functions_stay_small():
    too_long = []
    for name, path in _modules().items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}.py: {len(source.splitlines())} lines (> {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.py:{node.lineno} {node.name}: {n} lines (> {MAX_FUNCTION_LINES})")
    assert not too_long, "\n".join(too_long)


def test_card_templates_and_recipes_are_real_files():
    cards = PACKAGE.parent / "cards"
    for path in (cards, PACKAGE / "recipes"):
        assert path.is_dir() and not path.is_symlink(), f"{path} must be a folder, not a link"
    assert sorted(p.name for p in cards.glob("*.md")) == ["example.md", "relearn.md", "study.md"]
    assert (PACKAGE / "recipes" / "demo.yaml").is_file() and not (PACKAGE / "recipes" / "demo.yaml").is_symlink()


def test_wheel_and_sdist_install_and_run_in_a_fresh_venv(tmp_path):
    """``python -m build`` makes a wheel and an sdist; the wheel installs into a fresh venv whose ``hf-relearn``
    console script runs, finds the card templates (cards/) and the recipes, and renders a card.

    The fresh venv borrows this environment's dependencies (torch, transformers, ...) through a .pth line, so the
    test needs no download; hf_relearn itself comes only from the wheel."""
    import sysconfig
    import tarfile

    root = PACKAGE.parent
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(root)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    (wheel,) = dist.glob("hf_relearn-*.whl")
    (sdist,) = dist.glob("hf_relearn-*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "hf_relearn/card_templates/relearn.md",
        "hf_relearn/card_templates/study.md",
        "hf_relearn/recipes/demo.yaml",
    ):
        assert needed in names, f"{needed} missing from {wheel.name}"
    sdist_names = tarfile.open(sdist).getnames()
    for needed in ("cards/relearn.md", "LICENSE", "README.md", "hf_relearn/cli.py"):
        assert any(n.endswith("/" + needed) for n in sdist_names), f"{needed} missing from {sdist.name}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cli = subprocess.run(  # cwd elsewhere: the checkout's own hf_relearn/ must not be found first
        [str(venv / "bin" / "hf-relearn"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert cli.returncode == 0 and "card" in cli.stdout and "relearn" in cli.stdout, cli.stderr[-2000:]
    code = (
        "import hf_relearn, hf_relearn.cards as c; "
        f"assert hf_relearn.__file__.startswith({str(site)!r}), hf_relearn.__file__; "
        "assert (c.TEMPLATES / 'study.md').is_file(); "
        "print(c.template_path('relearn'))"
    )
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(site / "hf_relearn" / "card_templates" / "relearn.md")


def test_one_block_map_per_relearn(tmp_path, monkeypatch):
    """The trainer builds the run's one BlockMap; reset, freezing, the arms and the prefix plan reuse it."""
    from tiny import tiny

    from hf_relearn import blocks
    from hf_relearn.config import RelearnArguments
    from hf_relearn.data import DataArguments, build_datasets
    from hf_relearn.tokenization import byte_tokenizer
    from hf_relearn.trainer import RelearnTrainer

    built = []
    original_init = blocks.BlockMap.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(blocks.BlockMap, "__init__", counting_init)
    data = DataArguments(generated_chars=20_000, block_size=32, max_eval_samples=8)
    train, evals, collator = build_datasets(data, byte_tokenizer(), "clm")
    counts = {}
    for trainable, prefix_cache in (("block", "true"), ("lora-rest", "false")):
        model = tiny("gpt2", n_positions=32, n_embd=32, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        built.clear()
        args = RelearnArguments(
            output_dir=str(tmp_path / trainable), block="decoder.1", trainable=trainable, max_steps=2, eval_steps=1,
            prefix_cache=prefix_cache, report_to=[], save_final_model=False, disable_tqdm=True,
            per_device_train_batch_size=4, per_device_eval_batch_size=8,
        )  # fmt: skip
        trainer = RelearnTrainer(
            model=model, args=args, train_dataset=train, eval_dataset=evals, data_collator=collator
        )
        trainer.train()
        counts[trainable] = len(built)
    assert counts == {"block": 1, "lora-rest": 1}, f"BlockMaps built in one relearn: {counts}"


def test_the_contributing_layout_names_every_module():
    guide = (PACKAGE.parent / "CONTRIBUTING.md").read_text()
    layout = guide.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in _modules() if not name.startswith("__") and f"`{name}`" not in layout]
    assert not missing, f"CONTRIBUTING.md 'Layout' does not name: {missing}"
