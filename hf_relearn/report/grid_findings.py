"""Does the position of the reset layer matter, and do depth N and width D? Answers with spread, from results.csv.

The cost of one run is the share of its base's own budget it took to recover; a run that did not recover is
right-censored at the share it trained and enters no mean or rank as a value (``survival``: Kaplan-Meier summaries,
tests that count trained bases). Position is read per class (first, middle, last layer), and depth and width are
compared within a class, since first and last layers behave unlike the ones between them. Imports no torch.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from ..data.objectives import described_objective
from ..model.arm_registry import DEFAULT_ARM, split_variant, with_variant
from ..stats.summary import mean_sd, percent
from ..stats.survival import MIN_BASES, Outcome, paired, per_base, rank_correlation, ratio, summarise, trend
from ..study.grid import DEPTH_KEYS, WIDTH_KEYS, GridPoint, grid_of

LOOSER_TOLERANCES = (0.02, 0.05)  # read from each run's curve: it passes a looser threshold before it stops


def steps_within(row: dict, tolerance: float | None = None) -> tuple[int, bool]:
    """(steps, reached): the first evaluation at which the run's metric was within ``tolerance`` of its baseline
    (relative; the run's own rule when None), or (steps trained, False) when it never was. A tolerance looser than
    the run's own is read from its curve, which it crossed on the way to its own."""
    if tolerance is None or tolerance == row["tolerance"]:
        return (row["steps_to_recover"], True) if row["recovered"] else (row["steps_trained"], False)
    if tolerance < row["tolerance"]:
        raise ValueError(f"tolerance {tolerance} is tighter than the run's own {row['tolerance']}: not in its curve")
    base = row["baseline_metric"]
    higher = higher_is_better(row)
    threshold = base * (1 - tolerance) if higher else base * (1 + tolerance)
    for step, value in row["curve"]:
        if (value >= threshold) if higher else (value <= threshold):
            return int(step), True
    return row["steps_trained"], False


def higher_is_better(row: dict) -> bool:
    """Whether a larger value of the row's recovery metric is better: as its run decided it (``RelearnArguments``,
    recorded in the result); for a result written before that was recorded, any metric but a loss."""
    if row.get("higher_is_better") is not None:
        return bool(row["higher_is_better"])
    return not row["recovery_metric"].endswith("loss")


def outcome(row: dict, tolerance: float | None = None) -> Outcome:
    """One run as a censored cost: the share of its budget to within ``tolerance`` (observed), or the share it
    trained (censored). Needs ``original_steps``."""
    steps, reached = steps_within(row, tolerance)
    return Outcome(steps / row["original_steps"], reached, row["base_id"])


POSITIONS = ("first", "middle", "last")


def position(row: dict) -> str:
    """A reset layer's position class in its stack: ``first``, ``last`` or ``middle`` (every layer between)."""
    if row["layer"] == 0:
        return "first"
    return "last" if row["layer"] == row["n_layers"] - 1 else "middle"


def layer_runs(rows: list[dict]) -> list[dict]:
    """Whole-layer resets from scratch (no part, no swap), the runs that position, depth and width compare."""
    return [
        r
        for r in rows
        if r.get("layer") is not None and not r.get("part") and not r.get("swap") and r["init"] == "scratch"
    ]


def row_arm(row: dict) -> str:
    """A run's trainable arm, with ``@NAME`` when it ran the study's variant NAME of the relearn settings."""
    return with_variant(row["trainable"], row.get("variant"))


def reference_arm(arm: str) -> str:
    """The arm another is compared with: a variant's arm under the recipe's own settings, else ``block``."""
    own, variant = split_variant(arm)
    return own if variant else DEFAULT_ARM


def _key(grid: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in grid), None)


def _pct_sd(values: list[float]) -> str:
    m, sd = mean_sd(values)
    return "n/a" if math.isnan(m) else f"{100 * m:.1f} ± {100 * sd:.1f}%"


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs per (grid point, arm); an encoder-decoder's stacks apart (layer 0 of the encoder is not the decoder's)."""
    several_stacks = len({r.get("stack") for r in rows if r.get("stack")}) > 1
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        grid = GridPoint({**grid_of(r), "stack": r.get("stack")}) if several_stacks else grid_of(r)
        groups[(grid, row_arm(r))].append(r)
    return groups


def _tolerances(rows: list[dict]) -> list[float | None]:
    """The study's own tolerance, plus looser ones where a quarter or more of the runs never reached its own."""
    censored = sum(not r["recovered"] for r in rows)
    own = min((r["tolerance"] for r in rows if r.get("tolerance_abs") is None), default=None)
    if own is None or censored < len(rows) / 4:
        return [None]
    return [None] + [t for t in LOOSER_TOLERANCES if t > own]


def _costed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("original_steps")]


def _within(tol: float | None) -> str:
    return "" if tol is None else f", to within {100 * tol:g}%"


def position_words(rows: list[dict]) -> list[str]:
    """Per grid point and arm: each position class's cost (Kaplan-Meier), and whether a base's edge layers (first and
    last) cost more than its middle ones (a sign test over bases)."""
    out = []
    for (grid, arm), rs in _groups(_costed(layer_runs(rows))).items():
        if len({r["layer"] for r in rs}) < 2:
            continue
        for tol in _tolerances(rs):
            classes = {p: [outcome(r, tol) for r in rs if position(r) == p] for p in POSITIONS}
            cells = "; ".join(f"{p}: {summarise(o)}" for p, o in classes.items() if o)
            line = f"Position ({grid_of(grid).label()}, arm {arm}{_within(tol)}): {cells}."
            score = _scores_within_bases(rs, tol)
            trend_words = _within_base_words(
                rs, lambda r: r["layer"], lambda r, score=score: score[id(r)], "a later layer cost more"
            )
            out.append(line + _edges_words(rs, tol) + trend_words)
    return out


def _edges_words(rows: list[dict], tolerance: float | None) -> str:
    """Within each base: its edge layers (first and last, reduced to one outcome) against its middle ones."""
    edges = {o.base: o for o in per_base([outcome(r, tolerance) for r in rows if position(r) != "middle"])}
    inner = {o.base: o for o in per_base([outcome(r, tolerance) for r in rows if position(r) == "middle"])}
    pairs = [(edges[b], inner[b]) for b in edges if b in inner]
    if not pairs:
        return " No middle layer to compare the edges with."
    dearer, cheaper, undecided, test = paired(pairs)
    counts = f"in {dearer} of {len(pairs)} bases, cheaper in {cheaper}, undecided (censored) in {undecided}"
    verdict = f"{test}" if test else f"{len(pairs) - undecided} decided bases: too few to test, described only"
    return f" A base's first and last layers cost more than its middle ones {counts} ({verdict})."


def _no_effect(test, fitted) -> str:
    """The words for a test that found nothing: never 'does not matter'. Where the bases were as separated as their
    number allows (p at the design's floor), say that the design, not the data, stopped the test."""
    words = "no effect detected"
    if test.p <= test.min_p * (1 + 1e-6):
        words += " (yet every base was as far apart as this design can show: more bases are needed to decide)"
    if fitted is not None:
        words += f"; a Weibull fit on the per-base costs (a model, not the test) gives {fitted} per doubling"
    return words


def _effect_words(rows: list[dict], vary: tuple[str, ...], fixed: tuple[str, ...], name: str) -> list[str]:
    """For each value of the ``fixed`` key and each position class: the cost at each value of the ``vary`` key
    (Kaplan-Meier), a permutation test over bases of whether it follows the value, and the cost ratio per doubling
    with its interval (Weibull AFT on per-base outcomes)."""
    runs = [r for r in _costed(layer_runs(rows)) if row_arm(r) == DEFAULT_ARM]
    out = []
    by_fixed: dict[object, list[dict]] = defaultdict(list)
    for r in runs:
        vk, fk = _key(r["grid"], vary), _key(r["grid"], fixed)
        if vk:
            by_fixed[r["grid"].get(fk) if fk else None].append(r)
    for fixed_value, rs in sorted(by_fixed.items(), key=lambda kv: str(kv[0])):
        vk = _key(rs[0]["grid"], vary)
        values = sorted({r["grid"][vk] for r in rs})
        if len(values) < 2:
            continue
        at = f" at {_key(rs[0]['grid'], fixed)}={fixed_value}" if fixed_value is not None else ""
        for tol in _tolerances(rs):
            for where in POSITIONS:
                mine = [r for r in rs if position(r) == where]
                if len({r["grid"][vk] for r in mine}) < 2:
                    continue
                xs, outcomes = [r["grid"][vk] for r in mine], [outcome(r, tol) for r in mine]
                cells = "; ".join(
                    f"{vk}={v}: {summarise([o for x, o in zip(xs, outcomes, strict=True) if x == v])}"
                    for v in sorted(set(xs))
                )
                found, fitted = trend(xs, outcomes), ratio(xs, outcomes)
                if not any(o.recovered for o in outcomes):
                    verdict = "no run came back: nothing to compare, only that every cost is above its cap"
                elif found is None:
                    verdict = f"fewer than {MIN_BASES} bases at a value: described, not tested"
                else:
                    rho, test = found
                    if test.significant:
                        more = "costs more" if rho > 0 else "costs less"
                        verdict = f"larger {name} {more} ({test}; rho {rho:+.2f})" + (
                            f"; a Weibull fit on the per-base costs gives {fitted} per doubling" if fitted else ""
                        )
                    else:
                        verdict = f"{_no_effect(test, fitted)} ({test})"
                out.append(
                    f"{name[0].upper() + name[1:]}{at}, {where} layer (arm block{_within(tol)}): {cells}. {verdict}."
                )
    return out


def depth_width_words(rows: list[dict]) -> list[str]:
    """Depth N at fixed width and width D at fixed depth, per position class, in sentences."""
    return _effect_words(rows, DEPTH_KEYS, WIDTH_KEYS, "depth N") + _effect_words(
        rows, WIDTH_KEYS, DEPTH_KEYS, "width D"
    )


def repaired(row: dict) -> float:
    """The share of the reset's damage a run undid by its last step: (after reset - final) / (after reset - intact)."""
    damage = row["after_reset_eval_loss"] - row["baseline_eval_loss"]
    return (row["after_reset_eval_loss"] - row["final_eval_loss"]) / damage if damage > 0 else math.nan


def repaired_by_layer(runs: list[dict]) -> dict[int, list[float]]:
    """Each reset layer's shares of the damage repaired (``repaired``), in run order. A run whose reset did not raise
    the loss did no damage to repair: it has no share and is left out (its layer may map to an empty list)."""
    by_layer: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        by_layer[r["layer"]] += [] if math.isnan(repaired(r)) else [repaired(r)]
    return dict(by_layer)


def damage_relative(row: dict) -> bool:
    """Whether a run's tolerance is a share of the reset's damage, not of the intact loss (distill: the intact loss
    is 0; see ``result.recovery_threshold``)."""
    return described_objective(row["objective"]).distills and not row["baseline_eval_loss"]


def fixed_budget(rows: list[dict]) -> bool:
    """Whether every run trained the same steps (``stop_at_recovery: false``, or none recovered before the cap)."""
    return bool(rows) and len({r["steps_trained"] for r in rows}) == 1


def repaired_words(rows: list[dict]) -> list[str]:
    """For a study whose runs all trained the same steps (``stop_at_recovery: false``, or none recovered before the
    cap): per grid point and arm, the share of the damage each reset layer's runs undid in those steps (mean ± sd
    over seeds), and whether it follows the layer's position. Empty when runs stopped at different steps (some
    stopped at recovery: then the steps to recover are the answer)."""
    if not fixed_budget(rows):
        return []
    out = []
    for (grid, arm), rs in _groups(layer_runs(rows)).items():
        by_layer = repaired_by_layer(rs)
        cells = ", ".join(f"{layer}: {_pct_sd(v) if v else 'n/a'}" for layer, v in sorted(by_layer.items()))
        line = (
            f"Damage repaired in the fixed budget of {rs[0]['steps_trained']} steps ({grid_of(grid).label()}, "
            f"arm {arm}; 1 - (final - intact) / (after reset - intact), mean ± sd over seeds), by layer: {cells}."
        )
        undamaged = sum(math.isnan(repaired(r)) for r in rs)
        if undamaged:
            line += f" Left out: {undamaged} run(s) whose reset did not raise the loss (no damage to repair)."
        line += _within_base_words(rs, lambda r: r["layer"], repaired, "a later layer was repaired more")
        out.append(line)
    return out


def reset_jump(row: dict) -> float:
    """How much the reset alone raised the recovery metric (what ``hf-relearn probe`` measures): relative to the
    intact model, or absolute where the intact model scores 0 (distill)."""
    base, after = row["baseline_metric"], row["after_reset_metric"]
    return (after - base) / abs(base) if base else after - base


def _scores_within_bases(rows: list[dict], tolerance: float | None = None) -> dict[int, float]:
    """Each run's Gehan score among the runs of its own base (by ``id`` of the row): its cost's rank where a censored
    cost leaves it undecided."""
    from ..stats.survival import gehan_scores

    by_base: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_base[r["base_id"]].append(r)
    score = {}
    for runs in by_base.values():
        score.update(zip(map(id, runs), gehan_scores([outcome(r, tolerance) for r in runs]), strict=True))
    return score


def within_base_signs(rows: list[dict], x_of, y_of) -> dict[str, float]:
    """Per base with 3 or more reset layers: Spearman's rho of ``x_of`` with ``y_of`` over its layers (the runs of one
    layer, e.g. reset seeds, averaged first). The base is the unit: runs that repeat a layer add no base."""
    layers: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if not math.isnan(y_of(r)):
            layers[r["base_id"]][r["layer"]].append((x_of(r), y_of(r)))
    out = {}
    for base, by_layer in layers.items():
        points = np.array([np.mean(v, axis=0) for v in by_layer.values()])
        if len(points) >= 3:
            out[base] = float(rank_correlation(points[:, 0], points[:, 1]))
    return out


def jump_cost_signs(rows: list[dict], tolerance: float | None = None) -> dict[str, float]:
    """Per base: Spearman's rho over its reset layers of the loss jump right after the reset (``reset_jump``) with
    the cost of re-learning to within ``tolerance`` (the run's own if None), a censored cost entering by its Gehan
    score among the base's runs (dearer only where that is certain). Rows: one arm's layer runs."""
    score = _scores_within_bases(rows, tolerance)
    return within_base_signs(rows, reset_jump, lambda r: score[id(r)])


def _within_base_words(rows: list[dict], x_of, y_of, more: str) -> str:
    """Within each base with 3 or more reset layers, the sign of :func:`within_base_signs`; then a sign test over the
    bases."""
    from scipy import stats

    signs = list(within_base_signs(rows, x_of, y_of).values())
    up, down = sum(s > 0 for s in signs), sum(s < 0 for s in signs)
    if up + down < MIN_BASES:
        return f" Within a base, {more} in {up} of {len(signs)} bases (too few to test)."
    p = stats.binomtest(up, up + down, 0.5).pvalue
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    return (
        f" Within a base, {more} in {up} of {len(signs)} bases, less in {down} (sign test over bases, {p_text}; the "
        f"smallest p this design allows is {2 * 0.5 ** (up + down):.3g})."
    )


def jump_words(rows: list[dict]) -> list[str]:
    """Per grid point and arm: does the loss jump right after the reset go with the cost of re-learning, within a
    base (a censored cost enters by its Gehan score: dearer only where that is certain)?"""
    out = []
    runs = [r for r in rows if not r.get("swap") and r.get("original_steps")]
    fixed = fixed_budget(runs)  # every cost the same: relate the jump to the share of the damage repaired instead
    for (grid, arm), rs in _groups(runs).items():
        if len({reset_jump(r) for r in rs}) < 3:
            continue
        if fixed:
            measure, what = repaired, f"the share of the damage repaired in {rs[0]['steps_trained']} steps"
        else:
            score = _scores_within_bases(rs)
            measure, what = (lambda r, score=score: score[id(r)]), "the cost of re-learning"
        more = "a larger jump went with a higher " + ("share repaired" if fixed else "cost")
        words = _within_base_words(rs, reset_jump, measure, more)
        out.append(
            f"Zero-shot jump ({grid_of(grid).label()}, arm {arm}): the loss rise right after the reset, with no "
            f"training (what `hf-relearn probe` measures), vs {what}.{words}"
        )
    return out


def arm_words(rows: list[dict]) -> list[str]:
    """Where a grid point ran other arms beside ``block`` (or variants of the relearn settings): at each tolerance
    that runs reached or missed, each arm's cost (Kaplan-Meier) against its reference arm's (``reference_arm``), and
    in how many bases it was certainly cheaper (per base, its runs reduced to one outcome; a sign test over bases)."""
    out = []
    groups = _groups(_costed(layer_runs(rows)))
    for (grid, arm), rs in groups.items():
        ref = reference_arm(arm)
        theirs = [
            r
            for r in groups.get((grid, ref), [])
            if (r["base_id"], r["layer"]) in {(m["base_id"], m["layer"]) for m in rs}
        ]
        if arm == ref or not theirs:
            continue
        for tol in _tolerances(rs + theirs):
            mine_by = {o.base: o for o in per_base([outcome(r, tol) for r in rs])}
            ref_by = {o.base: o for o in per_base([outcome(r, tol) for r in theirs])}
            pairs = [(ref_by[b], mine_by[b]) for b in mine_by if b in ref_by]
            cheaper, dearer, undecided, test = paired(pairs)
            verdict = f"{test}" if test else "too few decided bases to test"
            out.append(
                f"Arms ({grid_of(grid).label()}{_within(tol)}): '{arm}' {summarise([outcome(r, tol) for r in rs])} vs "
                f"'{ref}' {summarise([outcome(r, tol) for r in theirs])}; '{arm}' certainly cheaper in {cheaper} of "
                f"{len(pairs)} bases, dearer in {dearer}, undecided in {undecided} ({verdict})."
            )
    return out


def _median_cell(outcomes: list[Outcome]) -> str:
    s = summarise(outcomes)
    median = f"not reached (≥{percent(s.followed)})" if math.isinf(s.median) else percent(s.median)
    return f"{median} ({s.recovered}/{s.runs})"


def grid_table(rows: list[dict]) -> str:
    """One line per grid point and arm: base budget, runs, runs back, and per position class the Kaplan-Meier median
    cost with runs back / runs (at the study's tolerance and at looser ones read from the curves)."""
    looser = [t for t in LOOSER_TOLERANCES if all(t > r["tolerance"] for r in rows)]
    tolerances = [None, *looser]
    heads = "".join(
        f"{p} to {'its tolerance' if t is None else f'{100 * t:g}%'} | " for t in tolerances for p in POSITIONS
    )
    lines = [
        "| grid point | arm | base budget (steps) | base eval loss | runs | back | " + heads,
        "|---|---|---:|---:|---:|---:|" + "---:|" * (len(POSITIONS) * len(tolerances)),
    ]
    for (grid, arm), rs in _groups(_costed(layer_runs(rows))).items():
        budgets = {r["base_id"]: r["original_steps"] for r in rs}
        losses = {r["base_id"]: r["baseline_eval_loss"] for r in rs}
        m, sd = mean_sd(list(budgets.values()))
        cells = ""
        for t in tolerances:
            for p in POSITIONS:
                mine = [outcome(r, t) for r in rs if position(r) == p]
                cells += f"{_median_cell(mine) if mine else '—'} | "
        lines.append(
            f"| {grid_of(grid).label()} | {arm} | {m:.0f} ± {sd:.0f} | {mean_sd(list(losses.values()))[0]:.4f} | "
            f"{len(rs)} | {sum(r['recovered'] for r in rs)} | " + cells
        )
    return "\n".join(lines)
