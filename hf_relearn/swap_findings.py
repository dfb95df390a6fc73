"""Why an encoder swap costs what it costs: the swap arms of a study set side by side, in words.

A swap study varies one thing at a time, so pairs of its summaries isolate a cause:

* the base's own cross-attention wiped vs a swapped encoder with its cross-attention wiped, both with only the
  cross-attention trainable: the same trainable tensors, only the encoder differs (**representation mismatch**);
* a reset (random) vs a zeroed cross-attention with the decoder trainable: random cross-attention output reaching a
  decoder that can change (**noise**), against none;
* the swapped encoder frozen vs trainable, and encoders of other widths.

Pure Python on ``findings.summarise`` output (no torch). An unrecovered run counts at the steps it trained (a lower
bound); two arms that both stopped unrecovered after the same steps are compared by the loss they ended at.
"""

from __future__ import annotations

ONLY_CROSS = "decoder-except-cross"
MARGIN = 0.1  # differences smaller than this share are left undecided: 3 seeds do not resolve them


def _excess(s: dict) -> float:
    """How far above the intact model's loss an arm ended, as a fraction (mean over seeds)."""
    return s["final_loss"] / s["baseline"] - 1


def outcome(s: dict) -> str:
    """One arm's result in a few words: steps to recover, or where it stood when it stopped."""
    if s["recovered"] == s["runs"]:
        return f"recovered in {s['cost']:.0f} steps ({s['recovered']}/{s['runs']} seeds)"
    if s["recovered"]:
        return f"{s['recovered']}/{s['runs']} seeds recovered, ≥{s['cost']:.0f} steps"
    return f"not recovered in {s['cost']:.0f} steps, ending {100 * _excess(s):+.1f}% above the intact loss"


def compare(a: dict, b: dict) -> int:
    """-1 when arm ``a`` is clearly cheaper than ``b``, 1 when ``b`` is, 0 when the runs cannot tell.

    Cheaper: recovered in over 10% (``MARGIN``) fewer steps, or recovered where the other had not after at least as many steps; when both
    stopped unrecovered after the same steps, the one that ended over 10% closer to the intact loss.
    """
    for x, y, sign in ((a, b, -1), (b, a, 1)):
        if x["censored"]:
            continue
        if y["censored"] and y["cost"] >= x["cost"] or not y["censored"] and x["cost"] < (1 - MARGIN) * y["cost"]:
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
