"""Built-in corpora that need no download: a generated English-like grammar and Python's standard-library source.

``generated_corpus`` draws sentences from the word tables below (``random.Random``, the same text on every machine);
``stdlib_corpus`` concatenates the interpreter's own ``*.py`` files. Both return plain ``str``.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from ..errors import RelearnError

_NAMES = (("Anna", "she"), ("Tom", "he"), ("Lena", "she"), ("Otto", "he"), ("Mira", "she"), ("Paul", "he"))
_PEOPLE = (
    ("miller", "millers"),
    ("baker", "bakers"),
    ("farmer", "farmers"),
    ("weaver", "weavers"),
    ("smith", "smiths"),
    ("sailor", "sailors"),
    ("teacher", "teachers"),
    ("potter", "potters"),
    ("fisherman", "fishermen"),
    ("child", "children"),
)
_PERSON_ADJECTIVES = ("old", "young", "tall", "kind", "clever", "tired", "quiet", "busy")
_THINGS = (
    ("apple", "apples"),
    ("loaf", "loaves"),
    ("basket", "baskets"),
    ("fish", "fish"),
    ("box", "boxes"),
    ("coin", "coins"),
    ("knife", "knives"),
    ("cup", "cups"),
    ("book", "books"),
    ("candle", "candles"),
    ("goose", "geese"),
)
_THING_ADJECTIVES = ("red", "green", "small", "heavy", "fresh", "wooden", "golden", "old", "large")
# (base form, third person singular, past tense)
_GIVING_VERBS = (
    ("sell", "sells", "sold"),
    ("give", "gives", "gave"),
    ("bring", "brings", "brought"),
    ("send", "sends", "sent"),
    ("show", "shows", "showed"),
    ("carry", "carries", "carried"),
)
_RESTING_VERBS = (
    ("sleep", "sleeps", "slept"),
    ("sing", "sings", "sang"),
    ("walk", "walks", "walked"),
    ("wait", "waits", "waited"),
    ("work", "works", "worked"),
    ("eat", "eats", "ate"),
)
_PLACES = ("market", "mill", "harbour", "village", "forest", "river", "bakery", "school")
_TIMES = ("in the morning", "at noon", "every evening", "on monday", "after the rain", "before dawn", "in winter")
_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def _subject(rng: random.Random) -> tuple[str, bool, str]:
    """A noun phrase, whether it is plural, and its pronoun."""
    if rng.random() < 0.25:
        name, pronoun = rng.choice(_NAMES)
        return name, False, pronoun
    singular, plural = rng.choice(_PEOPLE)
    adjective = f"{rng.choice(_PERSON_ADJECTIVES)} " if rng.random() < 0.5 else ""
    if rng.random() < 0.3:
        return f"the {adjective}{plural}", True, "they"
    return f"the {adjective}{singular}", False, "he" if rng.random() < 0.5 else "she"


def _things(rng: random.Random) -> tuple[str, str]:
    """``("seven red apples", "apples")``: a count agreeing with its noun, and the noun's plural."""
    index = min(int(rng.expovariate(0.35)), len(_NUMBERS) - 1)  # small counts are the common ones
    singular, plural = rng.choice(_THINGS)
    noun = singular if index == 0 else plural
    adjective = f"{rng.choice(_THING_ADJECTIVES)} " if rng.random() < 0.6 else ""
    return f"{_NUMBERS[index]} {adjective}{noun}", plural


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    subject, plural, pronoun = _subject(rng)
    past = rng.random() < 0.35
    if kind < 0.4:  # the old miller sells seven red apples to the baker.
        base, third, past_form = rng.choice(_GIVING_VERBS)
        verb = past_form if past else base if plural else third
        things, _ = _things(rng)
        other, _, _ = _subject(rng)
        return f"{subject} {verb} {things} to {other}."
    if kind < 0.6:  # the children sing at the river every evening.
        base, third, past_form = rng.choice(_RESTING_VERBS)
        verb = past_form if past else base if plural else third
        time = f" {rng.choice(_TIMES)}" if rng.random() < 0.5 else ""
        return f"{subject} {verb} at the {rng.choice(_PLACES)}{time}."
    if kind < 0.8:  # does the baker sell fresh loaves? yes, she sells two fresh loaves.
        base, third, _ = rng.choice(_GIVING_VERBS)
        things, noun = _things(rng)
        if rng.random() < 0.5:
            return f"{'do' if plural else 'does'} {subject} {base} {noun}? yes, {pronoun} {base if plural else third} {things}."
        return (
            f"{'do' if plural else 'does'} {subject} {base} {noun}? no, {pronoun} {base if plural else third} nothing."
        )
    if kind < 0.9:  # the smith has three cups, and the potter has five.
        _, first_noun = _things(rng)
        count, _ = _things(rng)
        other, other_plural, _ = _subject(rng)
        second = rng.choice(_NUMBERS)
        return f"{subject} {'have' if plural else 'has'} {count}, and {other} {'have' if other_plural else 'has'} {second}."
    start = rng.randrange(len(_NUMBERS) - 3)  # counting: a fully predictable continuation
    stop = rng.randrange(start + 3, len(_NUMBERS) + 1)
    return f"{subject} {'count' if plural else 'counts'}: {', '.join(_NUMBERS[start:stop])}."


def generated_corpus(n_chars: int, seed: int = 0) -> str:
    """Synthetic English-like text from a small probabilistic grammar, exactly ``n_chars`` characters long.

    Sentences such as "The old miller sells seven red apples to the baker." with subject-verb and number-noun
    agreement, questions answered by repeating their noun, counting runs, and paragraphs separated by line breaks.
    Guarantees: ASCII only; the same ``(n_chars, seed)`` gives the same text on every machine (``random.Random``);
    a text ``n`` characters long is a prefix of the text for any longer ``n_chars`` with the same seed; the structure
    lets a small language model get far below the unigram entropy (about 2.9 nats per byte).
    """
    if n_chars < 0:
        raise RelearnError(f"n_chars must be non-negative, got {n_chars}")
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < n_chars:
        sentences = [_sentence(rng) for _ in range(rng.randint(2, 5))]
        paragraph = " ".join(s[0].upper() + s[1:] for s in sentences)
        paragraph += "\n\n" if rng.random() < 0.25 else "\n"
        parts.append(paragraph)
        length += len(paragraph)
    return "".join(parts)[:n_chars]


def stdlib_corpus(max_chars: int) -> str:
    """Real text that exists on every machine without a download: the source of Python's own standard library.

    The top-level ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, in sorted file-name order, concatenated
    (each ending in a line break) and truncated to ``max_chars``. Deterministic for a given Python installation;
    another Python version gives other text. Shorter than ``max_chars`` only when the whole library is shorter.
    """
    if max_chars < 0:
        raise RelearnError(f"max_chars must be non-negative, got {max_chars}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in root.glob("*.py") if path.is_file())
    if not files:
        raise RelearnError(f"no standard-library sources (*.py) found in {root}")
    parts: list[str] = []
    length = 0
    for path in files:
        if length >= max_chars:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        text = text if text.endswith("\n") else text + "\n"
        parts.append(text)
        length += len(text)
    return "".join(parts)[:max_chars]
