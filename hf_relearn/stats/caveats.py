"""Warnings that make a measured recovery mislead, each with a code beside its sentence.

Reports and tests select warnings by code, never by matching their English text. A ``Caveat`` is a ``str`` (the
sentence, as printed and as stored in ``warnings``) that also carries ``.code`` (stored in ``warning_codes``).
"""

from __future__ import annotations

from collections.abc import Iterable

UNDER_TRAINED = "under_trained"  # the base's validation loss was still falling when its run ended
OVERFIT = "overfit"  # the base kept is past its best validation loss
RESET_BARELY_MATTERED = "reset_barely_mattered"  # right after the reset the metric was already within tolerance
UNIGRAM_LEVEL = "unigram_level"  # the base is no better than a unigram model of its data
SELECTED_ON_EVALUATION = "selected_on_evaluation"  # the base was chosen on the rows its baseline is measured on
NOISY_BASELINE = "noisy_baseline"  # the tolerance is under twice the recovery comparison's relative standard error
CODES = (UNDER_TRAINED, OVERFIT, RESET_BARELY_MATTERED, UNIGRAM_LEVEL, SELECTED_ON_EVALUATION, NOISY_BASELINE)

# results written before warnings had codes: the sentence's fixed opening names the code
_LEGACY_OPENINGS = {
    "base model under-trained": UNDER_TRAINED,
    "base model overfit": OVERFIT,
    "the reset barely mattered": RESET_BARELY_MATTERED,
    "the base model is no better than a unigram model": UNIGRAM_LEVEL,
}


class Caveat(str):
    """A warning sentence with its code; equal to, printed as and serialised as the sentence."""

    code: str

    def __new__(cls, code: str, message: str) -> Caveat:
        if code not in CODES:
            raise ValueError(f"unknown warning code {code!r}; known: {', '.join(CODES)}")
        caveat = super().__new__(cls, message)
        caveat.code = code
        return caveat

    def __reduce__(self):  # copy and pickle keep the code
        return (Caveat, (self.code, str(self)))


def code_of(warning: str) -> str | None:
    """The code of one warning: its own, or (a result written before codes existed) the one its opening names."""
    code = getattr(warning, "code", None)
    if code:
        return code
    return next((c for opening, c in _LEGACY_OPENINGS.items() if str(warning).startswith(opening)), None)


def codes_of(warnings: Iterable[str]) -> list[str]:
    """The codes of a list of warnings, in order (unknown legacy sentences are skipped)."""
    return [c for c in (code_of(w) for w in warnings) if c]


def attach_codes(messages: Iterable[str], codes: Iterable[str] | None) -> list[str]:
    """Warnings read back from a file: the sentences with their stored codes re-attached."""
    messages = list(messages)
    codes = list(codes) if codes is not None else [code_of(m) for m in messages]
    return [Caveat(c, m) if c in CODES else m for m, c in zip(messages, codes, strict=False)]
