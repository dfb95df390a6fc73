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

# each subpackage's (or top-level module's) layer; a module may import only from its own layer or below, and the
# subpackages never in a cycle (so imports between them point one way)
LAYERS: dict[str, int] = {
    "errors": 0, "storage": 0,  # the one error type; the files a run or study writes (no torch)
    "stats": 1,  # summaries, censored costs, warning rules (no torch)
    "model": 2, "data": 2,  # what is done to a model; what it reads
    "hub": 3,  # cards, plots, pushes (values in, files out)
    "relearn": 4,  # arguments, trainer, callbacks, results, the runs a user starts
    "study": 5,  # recipes, plans, workers, rows
    "report": 6,  # a study's answer (no torch)
    "cli": 7, "__main__": 7,  # the command line
    "__init__": 8,  # the package facade: loads public names lazily from every layer
}  # fmt: skip
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Every module by its dotted name inside the package (``model.blocks``, ``errors``); subpackage
    ``__init__`` files are checked apart (they hold a docstring only)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if len(parts) > 1 and parts[-1] == "__init__":
            continue
        out[".".join(parts)] = path
    return out


def _group(module: str) -> str:
    """The unit a layer is given to: a module's subpackage, or the top-level module itself."""
    return module.split(".")[0]


def _package_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (dotted, inside the package), at any depth (function-level imports
    included)."""
    here = list(path.relative_to(PACKAGE).with_suffix("").parts[:-1])  # the importing module's subpackage
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                if node.module:  # from .x import y, from ..model.blocks import y
                    out.add(".".join([*base, *node.module.split(".")]))
                else:  # from . import x
                    out.update(".".join([*base, alias.name]) for alias in node.names)
            elif node.module and node.module.startswith("hf_relearn."):
                out.add(node.module.removeprefix("hf_relearn."))
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("hf_relearn.") for a in node.names if a.name.startswith("hf_relearn."))
    return {name for name in out if name}


def test_every_module_has_a_layer():
    missing = sorted({_group(name) for name in _modules()} - set(LAYERS))
    assert not missing, f"give these subpackages or modules a layer in tests/test_layout.py: {missing}"
    stale = sorted(set(LAYERS) - {_group(name) for name in _modules()})
    assert not stale, f"tests/test_layout.py gives a layer to what does not exist: {stale}"


def test_each_subpackage_says_what_it_owns_and_loads_nothing():
    """A subpackage's ``__init__`` is its docstring of at most two lines, and nothing else: importing one of its
    modules loads no sibling (the report side stays free of torch)."""
    subpackages = sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))
    assert {p.name for p in subpackages} == {g for g in LAYERS if (PACKAGE / g).is_dir()}
    for folder in subpackages:
        tree = ast.parse((folder / "__init__.py").read_text())
        doc = ast.get_docstring(tree)
        assert doc and len(doc.splitlines()) <= 2, f"{folder.name}/__init__.py: say in two lines what it owns"
        assert len(tree.body) == 1, f"{folder.name}/__init__.py must hold its docstring only"


def test_imports_point_down_only():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for dep in _package_imports(path):
            if dep in modules and LAYERS[_group(dep)] > LAYERS[_group(name)]:
                upward.append(f"{name} (layer {LAYERS[_group(name)]}) imports {dep} (layer {LAYERS[_group(dep)]})")
    assert not upward, "imports must point down:\n" + "\n".join(upward)


def test_every_import_names_a_module_that_exists():
    modules = _modules()
    subpackages = {_group(name) for name in modules if "." in name}
    unknown = [
        f"{name} imports {dep}"
        for name, path in modules.items()
        for dep in _package_imports(path)
        if dep not in modules and dep not in subpackages
    ]
    assert not unknown, "\n".join(unknown)


def _find_cycle(graph: dict[str, set[str]]) -> None:
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


def test_no_import_cycles():
    """No cycle between modules, nor between subpackages (model and data share a layer, but only one of them may
    import the other)."""
    modules = _modules()
    graph = {name: {d for d in _package_imports(path) if d in modules and d != name} for name, path in modules.items()}
    _find_cycle(graph)
    groups: dict[str, set[str]] = {_group(name): set() for name in modules}
    for name, deps in graph.items():
        groups[_group(name)].update(_group(d) for d in deps if _group(d) != _group(name))
    _find_cycle(groups)


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    # two modules in two subpackages importing each other must be caught (so the tests above are not vacuous)
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "__init__.py").write_text('"""A subpackage."""\n')
    (tmp_path / "x" / "a.py").write_text("from ..y.b import z\n")
    (tmp_path / "y" / "b.py").write_text("def f():\n    from ..x.a import w\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    monkeypatch.setitem(LAYERS, "x", 1)
    monkeypatch.setitem(LAYERS, "y", 1)
    with pytest.raises(AssertionError, match="import cycle: x.a -> y.b -> x.a"):
        test_no_import_cycles()
    monkeypatch.setitem(LAYERS, "y", 0)
    with pytest.raises(AssertionError, match="y.b \\(layer 0\\) imports x.a \\(layer 1\\)"):
        test_imports_point_down_only()
    (tmp_path / "y" / "b.py").write_text("def f():\n    from ..x.gone import w\n")
    with pytest.raises(AssertionError, match="y.b imports x.gone"):
        test_every_import_names_a_module_that_exists()


def test_modules_and_functions_stay_small():
    too_long = []
    for path in _modules().values():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE)}: {len(source.splitlines())} lines (> {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(
                        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {n} lines (> {MAX_FUNCTION_LINES})"
                    )
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
    for needed in ("cards/relearn.md", "LICENSE", "README.md", "hf_relearn/cli/main.py"):
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
        "import hf_relearn, hf_relearn.hub.cards as c; "
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

    from hf_relearn.data.datasets import DataArguments, build_datasets
    from hf_relearn.data.tokenization import byte_tokenizer
    from hf_relearn.model import blocks
    from hf_relearn.relearn.arguments import RelearnArguments
    from hf_relearn.relearn.trainer import RelearnTrainer

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
    """CONTRIBUTING.md's layout table has one row per subpackage naming each of its modules (and a row for the
    top-level modules)."""
    guide = (PACKAGE.parent / "CONTRIBUTING.md").read_text()
    layout = guide.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[2].strip(): line for line in layout.splitlines() if line.count("|") > 3}
    missing = []
    for name in _modules():
        if name.startswith("__"):
            continue
        group, module = name.split(".") if "." in name else ("(top)", name)
        row = rows.get(f"`{group}/`" if group != "(top)" else "`hf_relearn/`", "")
        if f"`{module}`" not in row:
            missing.append(name)
    assert not missing, f"CONTRIBUTING.md 'Layout' does not name, in its subpackage's row: {missing}"
