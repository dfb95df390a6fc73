"""Why an encoder swap costs what it costs: the swap arms of a study set side by side, in words.

A swap study varies one thing at a time, so pairs of its summaries isolate a cause:

* the base's own cross-attention wiped vs a swapped encoder with its cross-attention wiped, both with only the
  cross-attention trainable: the same trainable tensors, only the encoder differs (**representation mismatch**);
* a reset (random) vs a zeroed cross-attention with the decoder trainable: random cross-attention output reaching a
  decoder that can change (**noise**), against none;
* the swapped encoder frozen vs trainable, and encoders of other widths.

Pure Python on ``findings.summarise`` output (no torch). An arm's cost is the Kaplan-Meier median of its runs' steps,
where a run that did not come back enters only as "not back by its cap"; where the median was not reached, the arm's
longest follow-up is a lower bound and is named as one. Two arms that both stopped unrecovered after the same steps
are compared by the loss they ended at.
"""

from __future__ import annotations

import math
import statistics

from ..model.arm_registry import DEFAULT_ARM
from ..stats.summary import percent
from ..stats.survival import Outcome, median_or_bound

ONLY_CROSS = "decoder-except-cross"
MARGIN = 0.1  # differences smaller than this share are left undecided: 3 seeds do not resolve them


def _excess(s: dict) -> float:
    """How far above the intact model's loss an arm ended, as a fraction (mean over seeds)."""
    return s["final_loss"] / s["baseline"] - 1


def arm_median(s: dict, share: bool = False) -> tuple[float, bool]:
    """An arm's Kaplan-Meier median steps to recover over its runs (or share of their budgets), and True where it was
    reached; else its longest follow-up, a lower bound, and False (``survival.median_or_bound``)."""
    runs = [Outcome(c / budget if share else c, back, "") for c, back, budget in s["run_costs"]]
    return median_or_bound(runs)


def outcome(s: dict) -> str:
    """One arm's result in a few words: its median steps to recover, or where it stood when it stopped."""
    steps, reached = arm_median(s)
    seeds = f"{s['recovered']}/{s['runs']} seeds"
    if s["recovered"] == s["runs"]:
        return f"recovered in a median {steps:.0f} steps ({seeds})"
    if reached:
        return f"{seeds} recovered, Kaplan-Meier median {steps:.0f} steps"
    if s["recovered"]:
        return f"{seeds} recovered, median not reached within {steps:.0f} steps"
    return f"not recovered in {steps:.0f} steps, ending {100 * _excess(s):+.1f}% above the intact loss"


def compare(a: dict, b: dict) -> int:
    """-1 when arm ``a`` is clearly cheaper than ``b``, 1 when ``b`` is, 0 when the runs cannot tell.

    Cheaper: a median reached in over 10% (``MARGIN``) fewer steps than the other's, or reached where the other's was
    not reached within at least as many steps; when both stopped unrecovered after the same steps, the one that ended
    over 10% closer to the intact loss. A median not reached is never compared as if it were a cost.
    """
    medians = {id(a): arm_median(a), id(b): arm_median(b)}
    for x, y, sign in ((a, b, -1), (b, a, 1)):
        (mx, x_reached), (my, y_reached) = medians[id(x)], medians[id(y)]
        if not x_reached:
            continue
        if not y_reached and my >= mx or y_reached and mx < (1 - MARGIN) * my:
            return sign
    if a["recovered"] == 0 and b["recovered"] == 0 and a["steps_trained"] == b["steps_trained"]:
        gap = a["final_loss"] - b["final_loss"]
        if abs(gap) > MARGIN * max(a["final_loss"] - a["baseline"], b["final_loss"] - b["baseline"]):
            return -1 if gap < 0 else 1
    return 0


def _find(swaps: list[dict], name: str, arm: str) -> dict | None:
    return next((s for s in swaps if s["block"] == name and s["arm"] == arm), None)


def _tally(pairs: list[tuple[dict, dict]]) -> tuple[int, int, int]:
    """How many pairs had the first arm cheaper, the second cheaper, undecided."""
    signs = [compare(a, b) for a, b in pairs]
    return signs.count(-1), signs.count(1), signs.count(0)


def mismatch_words(summary: list[dict]) -> list[str]:
    """The base's own cross-attention wiped vs swapped encoders, with only the cross-attention trainable."""
    own = next((s for s in summary if not s["swap"] and s["block"] == "decoder.*.cross_attention"), None)
    swaps = [s for s in summary if s["swap"] and s["arm"] == f"reset, {ONLY_CROSS}"]
    if own is None or not swaps:
        return []
    line = (
        "  Representation mismatch (only the cross-attention trains, encoder and decoder frozen, cross-attention "
        f"reset): with the base's own encoder, {outcome(own)}; "
        + "; ".join(f"with {s['block']} ({s['old_width']} → {s['swap_width']}), {outcome(s)}" for s in swaps)
    )
    own_cheaper, swap_cheaper, undecided = _tally([(own, s) for s in swaps])
    if own_cheaper == len(swaps):
        line += (
            ". The trainable tensors are the same, so the extra cost is the encoder's: the frozen decoder was trained "
            "to read its own encoder's representation, not this one's."
        )
    elif swap_cheaper + undecided == len(swaps):
        line += ". No swapped encoder cost more than wiping the base's own cross-attention: no mismatch shows."
    else:
        line += f". Own encoder cheaper than {own_cheaper} of {len(swaps)} swaps."
    return [line]


def _arm_pairs(swaps: list[dict], names: list[str], first: str, second: str) -> list[tuple[dict, dict]]:
    """Per swapped encoder that ran both arms: (its ``first`` arm, its ``second`` arm)."""
    found = [(_find(swaps, n, first), _find(swaps, n, second)) for n in names]
    return [(a, b) for a, b in found if a and b]


def _tally_words(pairs: list[tuple[dict, dict]], first: str, second: str) -> tuple[int, str]:
    """How many encoders had the first arm cheaper, and the counts in words ('X was cheaper for a of n encoders,
    Y for b, undecided c')."""
    first_cheaper, second_cheaper, undecided = _tally(pairs)
    words = f"{first} was cheaper for {first_cheaper} of {len(pairs)} encoders, {second} for {second_cheaper}" + (
        f", undecided {undecided}" if undecided else ""
    )
    return first_cheaper, words


def noise_words(summary: list[dict]) -> list[str]:
    """Reset vs zeroed cross-attention, and the decoder frozen vs trainable, per swapped encoder."""
    swaps = [s for s in summary if s["swap"]]
    names = list(dict.fromkeys(s["block"] for s in swaps))
    out = []
    for freeze, what in (
        ("all-trainable", "everything trainable"),
        (ONLY_CROSS, "only the cross-attention trainable"),
    ):
        pairs = _arm_pairs(swaps, names, f"zero, {freeze}", f"reset, {freeze}")
        if pairs:
            _, counts = _tally_words(pairs, "the zeroed one", "the reset one")
            detail = "; ".join(f"{z['block']}: zero {outcome(z)}, reset {outcome(r)}" for z, r in pairs)
            out.append(f"  Zeroed vs reset cross-attention ({what}): {counts} ({detail}).")
    pairs = _arm_pairs(swaps, names, f"reset, {ONLY_CROSS}", "reset, all-trainable")
    if pairs:
        frozen_cheaper, counts = _tally_words(pairs, "frozen", "trainable")
        verdict = (
            "Random cross-attention output reaching a decoder that can change costs extra: it moves the decoder's "
            "trained weights before the cross-attention carries anything useful."
            if frozen_cheaper == len(pairs)
            else "Letting the decoder train did not make the swap dearer: no sign that random cross-attention noise "
            "damages it."
            if frozen_cheaper == 0
            else "Mixed: the decoder's freedom helped some encoders and hurt others."
        )
        out.append(f"  Decoder frozen vs trainable (cross-attention reset): {counts}. {verdict}")
    return out


def swap_mechanism_words(summary: list[dict]) -> list[str]:
    """The causes a swap study separates, in words (empty without swap runs): representation mismatch, noise from a
    random cross-attention into a trainable decoder. (Which arms acted like training from scratch: ``findings``.)"""
    if not any(s["swap"] for s in summary):
        return []
    return mismatch_words(summary) + noise_words(summary)


DEFAULT_SWAP_ARM = "reset, decoder-except-cross"


def _recovery(s: dict) -> str:
    """The arm's Kaplan-Meier median steps to recover with its share of the budget, or the follow-up it was not back
    within (a lower bound, never an average of caps)."""
    steps, reached = arm_median(s)
    share = percent(arm_median(s, share=True)[0])
    seeds = f"{s['recovered']}/{s['runs']} seeds"
    if s["recovered"] == 0:
        return f"had not recovered when it stopped at {steps:.0f} steps ({share} of the budget; {seeds})"
    if reached:
        return f"recovered in a median {steps:.0f} steps ({share} of the budget; {seeds})"
    return f"median not reached within {steps:.0f} steps ({share} of the budget; {seeds} recovered)"


def _same_steps(s: dict) -> str:
    """'; after its N steps its loss was X, where the same model from scratch for N steps was at Y'."""
    if s["scratch_at_end"] is None:
        return ""
    gap = s["after"] - s["baseline"]
    closed = f" (it closed {100 * (s['after'] - s['final_loss']) / gap:.0f}% of the gap)" if gap > 0 else ""
    return (
        f"; after its {s['steps_trained']:.0f} steps its loss was {s['final_loss']:.3f}{closed}, where the same model "
        f"trained from scratch for {s['steps_trained']:.0f} steps was at {s['scratch_at_end']:.3f}"
    )


def swap_answer(summary: list[dict]) -> list[str]:
    """The encoder-swap question in words: after a swap with wiped cross-attention, how does recovery compare with
    wiping one layer's cross-attention, with wiping all of it, and with training the same model from scratch?

    Empty when the study has no swap runs. Costs are Kaplan-Meier medians over seeds: a run not back enters as "not
    back by its cap", and a median not reached is a lower bound, said in words. "From scratch" is the base run's own
    validation curve: the step at which training the base model from its random init first reached the same
    threshold (``original_steps_to_same_loss``).
    """
    swaps = [s for s in summary if s["swap"]]
    if not swaps:
        return []
    out = []
    blocks = [
        s for s in summary if not s["swap"] and s["block"].endswith(".cross_attention") and s["arm"] == DEFAULT_ARM
    ]
    one = next((s for s in blocks if s["layer"] is not None), None)
    every = next((s for s in blocks if s["layer"] is None), None)
    budget = swaps[0]["original_steps"]
    scratch = [s["scratch_steps"][0] for s in summary if not math.isnan(s["scratch_steps"][0])]
    scratch_steps = statistics.fmean(scratch) if scratch else None
    out.append(
        f"**Encoder swaps** (original budget {budget} steps; recovered = validation loss back within "
        f"{100 * swaps[0]['tolerance']:g}% of the intact model's):"
    )
    for s in swaps:
        width = f"encoder width {s['old_width']} → {s['swap_width']}" if s["swap_width"] else "encoder swapped"
        out.append(
            f"  {s['block']} ({width}; {s['arm']}): loss {s['baseline']:.3f} → {s['after']:.3f} "
            f"(+{100 * s['jump'][0]:.1f}%), {_recovery(s)}{_same_steps(s)}."
        )
    for name, s in (("one decoder layer's cross-attention wiped", one), ("all cross-attention wiped", every)):
        if s is not None:
            out.append(
                f"  {name} ({s['block']}, same encoder): loss +{100 * s['jump'][0]:.1f}%, {_recovery(s)}"
                f"{_same_steps(s)}."
            )
    heads = [s for s in swaps if s["arm"] == DEFAULT_SWAP_ARM] or swaps
    out += _swap_comparison(heads, one, scratch_steps)
    if scratch_steps:
        out.append(_swap_verdict(swaps, scratch_steps))
    out += _swap_same_steps(swaps)
    return out + swap_mechanism_words(summary)


def _against(steps: float, reached: bool, other: float, other_reached: bool, what: str) -> str:
    """One swap's median steps against another median (or a number of steps observed), in words that never treat
    a median not reached as a cost."""
    if reached and other_reached:
        return f"{steps / other:.2f}x {what}"
    if other_reached:
        return f"at least {steps / other:.2f}x {what}" if steps >= other else f"not yet decided against {what}"
    if reached and steps < other:
        return f"fewer steps than {what} (not back within {other:.0f})"
    return f"undecided against {what} (neither median reached)"


def _swap_comparison(heads: list[dict], one: dict | None, scratch_steps: float | None) -> list[str]:
    """The swaps of the default arm (``heads``) against the one-layer wipe and training from scratch, in median
    steps (Kaplan-Meier over seeds)."""
    parts = []
    for s in heads:
        steps, reached = arm_median(s)
        bits = []
        if one is not None:
            bits.append(_against(steps, reached, *arm_median(one), "the steps of the one-layer wipe"))
        if scratch_steps:
            bits.append(_against(steps, reached, scratch_steps, True, f"the {scratch_steps:.0f} steps from scratch"))
        if bits:
            parts.append(f"{s['block']}: " + " and ".join(bits))
    if not parts:
        return []
    return [
        f"  Compared ({heads[0]['arm']}; median steps over seeds, a run not back counted as not back by its cap): "
        + "; ".join(parts)
        + ". From scratch = the base run's own validation curve (the same base architecture from its random "
        "init reaching the same loss), not a from-scratch run of the swapped architecture."
    ]


def _swap_verdict(swaps: list[dict], scratch_steps: float) -> str:
    """How many swap arms needed at least as many steps as training from scratch (median, or a median not reached
    within as many), how many fewer, how many are undecided (not back, followed for fewer steps)."""
    medians = [(s, *arm_median(s)) for s in swaps]
    like = [s for s, steps, _ in medians if steps >= scratch_steps]  # a bound already past it counts too
    faster = [s for s, steps, reached in medians if steps < scratch_steps and reached]
    open_ = [s for s, steps, reached in medians if steps < scratch_steps and not reached]

    def names(ss: list[dict]) -> str:
        return ", ".join(f"{s['block']} [{s['arm']}]" for s in ss)

    verdict = [f"  Verdict, against the {scratch_steps:.0f} steps from scratch:"]
    if like:
        verdict.append(f"{len(like)}/{len(swaps)} swap arms needed at least as many ({names(like)});")
    if faster:
        verdict.append(f"{len(faster)}/{len(swaps)} recovered in fewer ({names(faster)});")
    if open_:
        verdict.append(
            f"{len(open_)}/{len(swaps)} had no median within fewer steps than that, so undecided ({names(open_)});"
        )
    return " ".join(verdict).rstrip(";") + "."


def _swap_same_steps(swaps: list[dict]) -> list[str]:
    """Whether the swap arms ended below the loss the same model had reached from scratch after as many steps."""
    out = []
    equal = [s for s in swaps if s["scratch_at_end"] is not None]
    if equal:
        ahead = [s for s in equal if s["final_loss"] < s["scratch_at_end"]]
        margins = [s["scratch_at_end"] - s["final_loss"] for s in ahead]
        line = (
            f"  Same number of steps: {len(ahead)}/{len(equal)} swap arms ended below the loss the same model had "
            "reached from scratch after as many steps"
        )
        if ahead:
            line += f" (by {min(margins):.3f} to {max(margins):.3f})"
        behind = [s for s in equal if s not in ahead]
        if behind:
            line += "; at or above it: " + ", ".join(f"{s['block']} [{s['arm']}]" for s in behind)
        out.append(
            line
            + (
                ". By that measure no swap acted like a full reset, even where it had not yet recovered to within "
                "the tolerance."
                if not behind
                else "."
            )
        )
    return out
