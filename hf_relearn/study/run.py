"""Study: a recipe (YAML) -> base models with a known budget -> a sweep of re-learn runs -> results.csv.

Layout of a study folder::

    recipe.yaml                 the recipe as run (with --set overrides applied)
    bases/<base>/               one pretrain run per (grid point, seed): model, trainer_state.json, curve
    runs/<base>/<run>/          one relearn run: relearn_result.json
    results.csv                 one row per finished run (rebuilt atomically after every run)
    report.md, plots/*.png      see report.py

Resumable by construction: a base is done when its ``hf_relearn_run.json`` exists, a run when its
``relearn_result.json`` exists (both written atomically, last); anything else found is a run that was killed
and is redone from scratch. ``results.csv`` is rebuilt from the result files, so it never holds a duplicate or a
half-written row.

The recipe itself (YAML, overrides, validation, the plan of bases and runs) lives in ``recipe.py``; its names are
re-exported here.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from ..data.objectives import described_objective
from ..errors import RelearnError
from ..relearn.arguments import eval_key
from ..relearn.prefix_cache import PrefixCache
from ..storage import CLAIMS, RESULT_FILE, RESULTS, RUN_FILE
from .plan import BaseSpec, RunSpec
from .recipe import STUDY_BASE, Recipe
from .rows import collect_rows, result_path, write_results
from .workers import WorkerBar, barrier, claimer, leave_launch_group, quiet_libraries, run_workers


# ------------------------------------------------------------------------------------------------ running
def _train_base(recipe: Recipe, base: BaseSpec, folder: Path) -> dict:
    from ..data.datasets import DataArguments
    from ..relearn.arguments import ModelArguments, PretrainArguments
    from ..relearn.runner import pretrain

    done = folder / RUN_FILE
    if done.exists():
        return json.loads(done.read_text())
    model_args = ModelArguments(
        model=base.model,
        config_overrides=dict(base.overrides) or None,
        head=recipe.base.get("head"),
        model_seed=base.seed,
    )
    settings = {"disable_tqdm": True, "seed": base.seed, **recipe.pretrain, "output_dir": str(folder)}
    resume = _resume_point(folder)
    if resume is not None:  # a killed base run that saved checkpoints goes on from its last unfinished one
        settings["resume_from_checkpoint"] = str(resume)
    args = PretrainArguments(objective=recipe.base.get("objective", "clm"), **settings)
    return pretrain(model_args, DataArguments(**recipe.data), args, quiet=True)


def _resume_point(folder: Path) -> Path | None:
    """The last checkpoint a killed base run can go on from; the checkpoints after it are deleted.

    A checkpoint is complete once its trainer_state.json is written (the Trainer writes it last). One saved when the
    training had ended (``should_training_stop``: the last step, or converged) is not resumed from: the Trainer only
    checks for the end after a step, so it would train one step more (a base of 61 steps instead of 60) or go on past
    the convergence; the segment before it is trained again instead (resuming is exact), or the whole run.
    """
    checkpoints = sorted(
        (c.parent for c in folder.glob("checkpoint-*/trainer_state.json")), key=lambda c: int(c.name.split("-")[-1])
    )
    while checkpoints:
        state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
        control = state.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {})
        ended = control.get("should_training_stop") or 0 < state.get("max_steps", 0) <= state.get("global_step", 0)
        if not ended:
            break
        shutil.rmtree(checkpoints.pop())
    return checkpoints[-1] if checkpoints else None


def _run_one(
    recipe: Recipe, run: RunSpec, base_dir: Path | None, folder: Path, prefix_cache=None, baseline: dict | None = None
) -> dict:
    from ..data.datasets import DataArguments
    from ..relearn.arguments import ModelArguments, RelearnArguments
    from ..relearn.runner import relearn

    done = folder / RESULT_FILE
    if done.exists():
        return json.loads(done.read_text())
    settings = {
        "disable_tqdm": True,
        "seed": run.seed,
        "save_final_model": False,
        **recipe.relearn_settings(run.variant),
    }
    settings.update(
        output_dir=str(folder), block=run.block, init=run.init, trainable=run.trainable, reset_seed=run.seed
    )
    settings.setdefault("objective", recipe.base.get("objective", "clm"))
    if base_dir is not None:
        settings["original_run"] = str(base_dir)
    if run.swap is not None:
        encoder = run.swap_encoder
        if encoder.startswith(STUDY_BASE):  # a donor base this study trained: its folder
            encoder = str(base_dir.parent / encoder.removeprefix(STUDY_BASE))
        settings.update(
            swap_encoder=encoder,
            swap_encoder_overrides=_swap_overrides(run, base_dir),
            swap_cross_attention=run.swap_cross_attention,
            swap_freeze=run.swap_freeze,
            swap_warmup_steps=run.swap_warmup_steps,
            swap_stitch=run.swap_stitch,
        )
    model = str(base_dir) if base_dir is not None else run.base.model
    data_args = DataArguments(**recipe.data)
    # a ready-trained base (no pretrain section) is loaded here, so its config overrides apply here (a base the
    # study trained has them built in)
    overrides = (dict(run.base.overrides) or None) if base_dir is None else None
    model_args = ModelArguments(model=model, head=recipe.base.get("head"), config_overrides=overrides)
    args = RelearnArguments(**settings)
    return relearn(model_args, data_args, args, quiet=True, prefix_cache=prefix_cache, baseline=baseline).to_dict()


def _swap_overrides(run: RunSpec, base_dir: Path | None) -> str | None:
    """The new encoder's config overrides as ``k=v,...``; a model type built from config gets the base's vocab size
    (a native encoder-decoder feeds its encoder the decoder's token ids) unless the recipe sets one."""
    from ..model.modeling import is_config_name

    overrides = dict(run.swap_overrides)
    if base_dir is not None and is_config_name(str(run.swap_encoder)) and "vocab_size" not in overrides:
        overrides["vocab_size"] = json.loads((base_dir / "config.json").read_text())["vocab_size"]
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or None


def _remove_unfinished(out: Path, bases: list[BaseSpec], plan: list[tuple[BaseSpec, RunSpec]]) -> None:
    """Delete what a killed earlier attempt left half-done (done by one process, before any training)."""
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)  # left by a write that a kill interrupted; the file it replaced is intact
    shutil.rmtree(out / CLAIMS, ignore_errors=True)  # taken by processes that are gone; their work is redone
    for base in bases:
        folder = out / "bases" / base.id
        if folder.exists() and not (folder / RUN_FILE).exists() and not any(folder.glob("checkpoint-*")):
            shutil.rmtree(folder)
    for _, run in plan:
        folder = out / "runs" / run.id
        if folder.exists() and not (folder / RESULT_FILE).exists():
            shutil.rmtree(folder)


def _wait_for(paths: list[Path], what: str, timeout_s: float = 24 * 3600) -> None:
    import time

    start = time.time()
    while not all(p.exists() for p in paths):
        if time.time() - start > timeout_s:
            raise RelearnError(f"gave up waiting for {what} (another process of this launch died?)")
        time.sleep(1.0)


def _open_study(recipe: Recipe, out: Path, rank: int) -> tuple[list[BaseSpec], list[tuple[BaseSpec, RunSpec]]]:
    """The study's bases and plan; refuses a folder that holds another recipe's study. The main process (``rank``
    0) then removes unfinished work and writes recipe.yaml (atomically) if it is not there yet."""
    out.mkdir(parents=True, exist_ok=True)
    recipe_file = out / "recipe.yaml"
    grown = False  # the recipe adds variants to the one the folder's study ran: its finished runs are kept
    if recipe_file.exists():
        previous = yaml.safe_load(recipe_file.read_text())
        if not recipe.extends(previous):
            raise RelearnError(
                f"{out} holds a study of a different recipe ({recipe_file}); use another --output-dir, or delete it "
                "(a recipe may only add sweep.variants to a study already started)"
            )
        grown = previous != recipe.to_dict()
    bases = recipe.bases()
    plan = [(b, r) for b in bases for r in recipe.runs_for(b)]
    if rank == 0:
        _remove_unfinished(out, bases + recipe.donors(), plan)
        if grown or not recipe_file.exists():
            tmp = out / ".recipe.yaml.tmp"
            tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            os.replace(tmp, recipe_file)
    return bases, plan


def _finished(out: Path, plan: list[tuple[BaseSpec, RunSpec]]) -> int:
    """How many runs of the whole plan are finished, whichever process ran them."""
    return sum(result_path(out, run).exists() for _, run in plan)


def _train_bases(recipe: Recipe, bases: list[BaseSpec], out: Path, bar, claim: Callable[[str], bool] | None) -> None:
    """Train every base not yet trained; with ``claim``, only those this process claims first."""
    if recipe.pretrain is None:
        return
    trained = bases + recipe.donors()  # donors: bases trained only to give their encoders to swaps
    for base in trained:
        if not (out / "bases" / base.id / RUN_FILE).exists() and (claim is None or claim(f"base-{base.id}")):
            bar.set_postfix_str(f"training base {base.id}")
            _train_base(recipe, base, out / "bases" / base.id)
    if claim is None:  # every process trains every base together (DDP): the runs wait for all of them
        _wait_for([out / "bases" / b.id / RUN_FILE for b in trained], "the other processes' base models")


def _next_ready(recipe: Recipe, todo: list[tuple[BaseSpec, RunSpec]], out: Path, timeout_s: float = 24 * 3600):
    """The first item of ``todo`` whose base (and donors) are trained, waiting while another process trains them."""
    import time

    if recipe.pretrain is None:  # the bases are given, nothing to wait for
        return todo[0]
    donors = recipe.donors()
    start = time.time()
    while True:
        for base, run in todo:
            if all((out / "bases" / b.id / RUN_FILE).exists() for b in [base, *donors]):
                return base, run
        if time.time() - start > timeout_s:
            raise RelearnError("gave up waiting for a base model that another process trains (did it die?)")
        time.sleep(1.0)


def _work(
    recipe: Recipe,
    bases: list[BaseSpec],
    plan: list[tuple[BaseSpec, RunSpec]],
    out: Path,
    bar,
    claim: Callable[[str], bool] | None = None,
    write_rows: bool = True,
) -> None:
    """Train the bases, then run the plan's unfinished runs, rewriting results.csv after each when ``write_rows``.

    With ``claim`` (processes that share the study, each training alone), each base and run goes to the process
    that claims it first, and a process takes the next run whose base is ready: no process idles while work is
    left. Without it, this process does every piece, in order (all processes together, under DDP).
    """
    _train_bases(recipe, bases, out, bar, claim)
    # one frozen-prefix cache per base, shared by its runs (same frozen weights, same data); top layers first, as a
    # fill computes every lower layer boundary on its way and stores them all (prefix_cache.py)
    todo = sorted(plan, key=lambda item: (bases.index(item[0]), -(item[1].layer if item[1].layer is not None else -1)))
    todo = [(base, run) for base, run in todo if not result_path(out, run).exists()]
    cache, cache_base = None, None
    # (base id, variant) -> the intact model's metrics, measured by the first such run here (a variant may change how
    # the model is evaluated)
    baselines: dict[tuple[str, str | None], dict] = {}
    while todo:
        base, run = _next_ready(recipe, todo, out)
        todo.remove((base, run))
        if result_path(out, run).exists() or (claim is not None and not claim(f"run-{run.id}")):
            continue  # done by another process meanwhile, or being done by one
        base_dir = out / "bases" / base.id if recipe.pretrain is not None else None
        bar.set_postfix_str(run.id)
        if cache_base != base.id:
            if cache is not None:
                cache.close()
            cache, cache_base = PrefixCache(capture_all=True), base.id
        result = _run_one(
            recipe,
            run,
            base_dir,
            out / "runs" / run.id,
            prefix_cache=cache,
            baseline=baselines.get((base.id, run.variant)),
        )
        if not described_objective(result["objective"]).distills:  # same base, data and evaluation: same numbers
            key = eval_key(result["recovery_metric"])
            baselines[(base.id, run.variant)] = {
                "eval_loss": result["baseline_eval_loss"],
                "eval_loss_se": result.get("eval_loss_se"),
                key: result["baseline_metric"],
            }
        if write_rows:
            write_results(out / RESULTS, collect_rows(recipe, plan, out))
        steps = result["steps_to_recover"]
        outcome = (
            f"recovered in {steps} steps" if result["recovered"] else f"not recovered in {result['steps_trained']}"
        )
        bar.write(f"{run.id}: {result['after_reset_eval_loss']:.4f} -> {outcome}")
        bar.n = _finished(out, plan)
        bar.refresh()
    if cache is not None:
        cache.close()


def _worker(recipe: Recipe, out: str, bar: WorkerBar) -> None:
    """One of ``run_study``'s local worker processes: claims and runs its pieces of the study in ``out``."""
    quiet_libraries()
    bases, plan = _open_study(recipe, Path(out), rank=1)  # not 0: the parent cleaned up before starting workers
    _work(recipe, bases, plan, Path(out), bar, claim=claimer(Path(out) / CLAIMS))


def run_study(
    recipe: Recipe,
    output_dir: str | os.PathLike,
    progress: bool = True,
    parallel: str = "data",
    workers: int = 1,
    threads_per_worker: int | None = None,
) -> list[dict]:
    """Train the bases, run every relearn of the sweep (skipping finished ones), keep results.csv current.

    Returns the rows of results.csv in plan order. Safe to kill at any moment and start again with the same
    recipe and output_dir: finished work is kept, unfinished work redone.

    ``workers`` > 1 starts that many processes on this machine, ``threads_per_worker`` CPU threads each (default:
    the cores shared out); each takes the next base or run nobody has taken, so all stay busy. A run's numbers do
    not depend on which process ran it, only on the threads it ran with.

    Under ``accelerate launch`` with N processes: ``parallel="data"`` (default) runs every relearn on all N
    processes together (DDP); ``parallel="runs"`` lets each process take bases and runs as above, each trained
    alone; the main process waits for all and writes the final results.csv.
    """
    from tqdm.auto import tqdm

    if parallel not in ("data", "runs"):
        raise RelearnError(f"parallel must be 'data' or 'runs', got {parallel!r}")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if workers < 1 or (threads_per_worker is not None and threads_per_worker < 1):
        raise RelearnError(f"workers and threads per worker must be at least 1, got {workers}, {threads_per_worker}")
    if workers > 1 and world > 1:
        raise RelearnError("--workers starts processes on this machine; under accelerate launch use --parallel runs")
    out = Path(output_dir)
    bases, plan = _open_study(recipe, out, rank)
    barrier()  # nobody trains before the clean-up is done
    bar = tqdm(
        total=len(plan),
        initial=_finished(out, plan),
        desc=f"study {recipe.name}",
        unit="run",
        disable=not progress or rank != 0,
    )
    shared = parallel == "runs" and world > 1
    if workers > 1:
        run_workers(_worker, (recipe, str(out)), workers, threads_per_worker, bar)
        unfinished = [run.id for _, run in plan if not result_path(out, run).exists()]
        if unfinished:  # every worker ended well, yet a run was claimed and never done: never a silent gap
            raise RelearnError(f"the workers left {len(unfinished)} run(s) unfinished: {', '.join(unfinished[:3])}")
    else:
        if shared:
            leave_launch_group()
        if threads_per_worker is not None:
            import torch

            torch.set_num_threads(threads_per_worker)
        _work(
            recipe,
            bases,
            plan,
            out,
            bar,
            claim=claimer(out / CLAIMS) if shared else None,
            write_rows=rank == 0 or shared,
        )
    bar.close()
    if shared:
        _wait_for([result_path(out, r) for _, r in plan], "the other processes' runs")
    rows = collect_rows(recipe, plan, out)
    if rank == 0:
        write_results(out / RESULTS, rows)
        shutil.rmtree(out / CLAIMS, ignore_errors=True)
    return rows
