"""Report: results.csv -> a table, plots and the answer in words (``report.md`` + ``plots/*.png``).

Built from results.csv alone (``hf-relearn report DIR``), so a study copied elsewhere can be re-reported. The numbers
and words come from ``findings.py``, the plots from ``study_plots.py``; this module assembles report.md, with the
warnings that make recovery numbers mislead at the top. It imports no torch or transformers (neither do those two),
and its former names stay importable from here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import RelearnError
from ..stats.caveats import NOISY_BASELINE, RESET_BARELY_MATTERED, UNIGRAM_LEVEL, codes_of
from ..storage import RESULTS, read_results
from ..study.recipe import STUDY_BASE
from .findings import answer_in_words, summarise, table_markdown, table_text
from .grid_findings import damage_relative, grid_table, layer_runs
from .plots import make_plots


# ------------------------------------------------------------------------------------------------ report
def _base_models(rows: list[dict]) -> str:
    """The base model, or for a grid its values (each row's ``base_model`` holds its own grid point's overrides)."""
    models = list(dict.fromkeys(r["base_model"] for r in rows))
    if len(models) == 1:
        return f"Base model: {models[0]}."
    keys = list(dict.fromkeys(k for r in rows for k in r["grid"]))
    values = {k: sorted({r["grid"][k] for r in rows if k in r["grid"]}, key=str) for k in keys}
    grid = " x ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in values.items())
    return f"Base models: {len(models)} grid points, {grid}; the first is {models[0]}."


def build_report(study_dir: str | os.PathLike) -> dict:
    """Rebuild ``report.md`` and ``plots/`` from ``results.csv`` alone; returns paths, the table and the answer."""
    study_dir = Path(study_dir)
    rows = read_results(study_dir / RESULTS)
    if not rows:
        raise RelearnError(f"{study_dir / RESULTS} has no rows yet")
    summary = summarise(rows)
    plots = make_plots(rows, summary, study_dir / "plots")
    words = answer_in_words(rows, summary)
    warnings = _warnings(rows)
    first = rows[0]
    lines = [f"# hf-relearn study: {first['study']}", "", _base_models(rows), ""]
    if warnings:
        lines += ["> **Read this first — these make recovery numbers mislead:**", ">"]
        lines += [f"> - {w}" for w in warnings] + [""]
    lines += ["## The answer", ""] + [f"- {w.strip()}" for w in words] + [""]
    if layer_runs(rows):
        lines += [
            "## Position, depth and width",
            "",
            "Cost of one run = steps to recover / its base's budget. Each cell: the Kaplan-Meier median cost of the "
            "runs of that position class (the first layer, the middle layers, the last layer) and how many came back; "
            "a run not back enters only as 'not back by the share it trained' (never averaged), and a median not "
            "reached is shown with the longest share followed. 'to 2%' / 'to 5%': the same at that looser tolerance, "
            "read from each run's curve. The answer above tests over trained bases, not runs.",
            "",
            grid_table(rows),
            "",
        ]
    lines += [
        "## Table",
        "",
        f"Recovered = validation {first['recovery_metric']} back within {100 * first['tolerance']:g}% of "
        + (
            "the damage the reset did (distill: the intact model's loss is 0)"
            if damage_relative(first)
            else "the intact model's"
        )
        + f", held for {first['patience']} evaluation(s). Mean ± sd over seeds; runs that did not recover are "
        "left out of the means and counted in the 'recovered' column.",
        "",
        table_markdown(summary),
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    lines += _how_measured(rows)
    report = study_dir / "report.md"
    tmp = study_dir / ".report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, report)
    return {"report": report, "plots": plots, "table": table_text(summary), "answer": words, "warnings": warnings}


def _swap_encoders(rows: list[dict]) -> str:
    """Where the swapped-in encoders came from, as the rows' ``swap_encoder`` says."""
    kinds = []
    encoders = {str(r.get("swap_encoder")) for r in rows if r.get("swap")}

    def is_config_name(e: str) -> bool:  # a model type (t5, mt5): transformers' own check would import it
        return re.fullmatch(r"[a-z0-9_]+", e) is not None and not os.path.exists(e)

    if any(e.startswith(STUDY_BASE) for e in encoders):
        kinds.append(
            "a trained encoder taken from a donor model the study trained to convergence on the same data with its own "
            "seed (`swap_encoder` names it under `bases/`)"
        )
    if any(is_config_name(e) for e in encoders):
        kinds.append("a new encoder built from config (fresh weights)")
    if any(not e.startswith(STUDY_BASE) and not is_config_name(e) for e in encoders):
        kinds.append("a saved or Hub encoder (`swap_encoder`)")
    return "; ".join(kinds)


def _how_measured(rows: list[dict]) -> list[str]:
    """The report's last section: what was run, how the frozen weights were checked, the versions."""
    return [
        "## How this was measured",
        "",
        f"- {len(rows)} relearn runs; objective {rows[0]['objective']}; {_bases_line(rows)}.",
        "- Each run: the intact base model's validation loss (baseline), the block reset to its from-scratch "
        "distribution, everything else frozen (proven bit-identical after training: "
        f"{sum(bool(r['frozen_unchanged']) for r in rows)}/{len(rows)} runs), then training until recovered.",
        *(
            [
                f"- Encoder swaps (rows with a `swap` name): {_swap_encoders(rows)}, the width in `swap_width`; the "
                "decoder's cross-attention reset (or zeroed) and every cross-attention key/value "
                "resized to the new width where the model has no projection (see README, encoder swaps); arms in "
                "`swap_cross_attention`, `swap_freeze` (`decoder-except-cross`: only the cross-attention trains, the "
                "new encoder and the decoder's other tensors frozen and proven unchanged; `encoder-trainable`: the "
                "new encoder trains too; `all-trainable`: everything trains), `swap_warmup_steps`. From scratch = "
                "the base run's own validation curve (`base_curve`)."
            ]
            if any(r.get("swap") for r in rows)
            else []
        ),
        *(
            [
                "- Variants of the relearn settings (arms ending `@NAME`; each compared with the same arm under the "
                f"recipe's own settings, on the same base and layer): {_variants(rows)}."
            ]
            if any(r.get("variant") for r in rows)
            else []
        ),
        f"- versions: {json.dumps(rows[0]['versions'])}",
        "",
        "Rebuild with `hf-relearn report` on this folder; raw numbers in `results.csv`, each run's curve in "
        "`runs/*/*/relearn_result.json`.",
    ]


def _variants(rows: list[dict]) -> str:
    """Each variant of the relearn settings the study ran, with the settings it put over the recipe's."""
    named = {r["variant"]: r.get("variant_settings") or {} for r in rows if r.get("variant")}
    return "; ".join(
        f"`{name}` = " + ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
        for name, settings in named.items()
    )


def _bases_line(rows: list[dict]) -> str:
    """How the bases were trained: their budgets (steps to the kept model) and how their runs ended."""
    bases = {r["base_id"]: r for r in rows if r.get("base_id")}
    budgets = sorted(r["base_steps"] for r in bases.values() if r.get("base_steps"))
    stops = sorted({str(r.get("base_stopped") or "max_steps") for r in bases.values()})
    if not budgets:
        return "a ready-trained base"
    span = f"{budgets[0]}" if budgets[0] == budgets[-1] else f"{budgets[0]} to {budgets[-1]}"
    converged = (
        "trained until converged (best checkpoint kept)" if stops == ["converged"] else f"stopped: {', '.join(stops)}"
    )
    return f"{len(bases)} base(s), {converged}; budgets {span} steps"


def _codes(row: dict, codes_column: str, warnings_column: str) -> list[str]:
    """A row's warning codes (rows written before codes existed: from the warnings' sentences)."""
    codes = row.get(codes_column)
    return list(codes) if isinstance(codes, list) else codes_of(row.get(warnings_column) or [])


def _selected_on(row: dict) -> str | None:
    """What chose a row's base: recorded (``base_selected_on``), or for rows written before it was, a base trained
    until converged kept the checkpoint best on the rows that also measured its baseline."""
    if "base_selected_on" in row:
        return row["base_selected_on"]
    return "evaluation split" if row.get("base_stopped") == "converged" else None


def _warnings(rows: list[dict]) -> list[str]:
    out: list[str] = []
    for r in rows:
        for w in r.get("base_warnings") or []:
            msg = f"base {r['base_id']}: {w}"
            if msg not in out:
                out.append(msg)
    barely = sorted(
        {
            f"{r['block']} ({r['base_id']})"
            for r in rows
            if RESET_BARELY_MATTERED in _codes(r, "warning_codes", "warnings")
        }
    )
    if barely:
        out.append(
            "resets that barely raised the loss (already within the tolerance right after the reset; these layers did "
            f"little, their 'recovery' is cheap by construction): {', '.join(barely)}"
        )
    unigram = sorted({r["base_id"] for r in rows if UNIGRAM_LEVEL in _codes(r, "warning_codes", "warnings")})
    if unigram:
        out.append(f"bases no better than a unigram model of their data: {', '.join(unigram)}")
    chosen = sorted({r["base_id"] for r in rows if _selected_on(r) == "evaluation split"})
    if chosen:
        out.append(
            "bases chosen on the rows their baselines are measured on (the best checkpoint of a run to convergence, "
            "picked on its validation rows, which then measured its baseline: a baseline that is the best of many "
            f"noisy draws; pretrain now picks on a separate selection split): {', '.join(chosen)}"
        )
    noisy = [r for r in rows if NOISY_BASELINE in _codes(r, "warning_codes", "warnings")]
    if noisy:
        paired = sum(r.get("final_minus_baseline_se") is not None for r in noisy)
        noise = (
            "paired over the evaluation rows: the final-minus-intact loss's"
            if paired == len(noisy)
            else "the baseline's own: these results predate the paired one, and it overstates the comparison's noise"
            if paired == 0
            else f"paired in {paired} runs; the baseline's own, which overstates it, in {len(noisy) - paired}"
        )
        out.append(
            f"{len(noisy)} of {len(rows)} runs have a tolerance under twice the relative standard error of their "
            f"recovery comparison ({noise}; a recovery that close is inside the noise), over bases: "
            + ", ".join(sorted({r["base_id"] for r in noisy}))
        )
    changed = [r["run_id"] for r in rows if not r["frozen_unchanged"]]
    if changed:
        out.append(f"frozen tensors changed in: {', '.join(changed)}")
    return out
