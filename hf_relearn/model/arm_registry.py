"""Trainable arms: what trains while a reset block re-learns, one object per arm, found by name in one registry.

An arm says whether the block trains, whether every other parameter trains, and whether LoRA adapters go on every
other layer; ``arms.apply_trainable`` reads these and nothing compares an arm's name. Imports nothing heavy, so
reports read the labels. Adding an arm is one :func:`register_arm` call with a new :class:`Arm`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RelearnError


@dataclass(frozen=True)
class Arm:
    """One arm. ``label``: its name in a report's words; ``description``: in a model card's."""

    name: str
    label: str
    description: str
    trains_block: bool = True  # the reset block's own parameters train
    trains_everything: bool = False  # every parameter of the model trains
    lora_rest: bool = False  # LoRA adapters on every other layer train

    @property
    def only_the_block(self) -> bool:
        """Nothing but the block trains: every layer below it stays frozen, so their outputs can be cached."""
        return self.trains_block and not self.trains_everything and not self.lora_rest


ARMS: dict[str, Arm] = {}
DEFAULT_ARM = "block"  # the question's own arm: only the reset block trains


def register_arm(arm: Arm) -> Arm:
    """Make ``arm`` available under ``arm.name`` (``--trainable``, recipes' ``sweep.trainable``). Refuses a name taken
    by a different arm; returns the arm."""
    taken = ARMS.get(arm.name)
    if taken is not None and taken != arm:
        raise RelearnError(f"arm {arm.name!r} is already registered as {taken}")
    ARMS[arm.name] = arm
    return arm


def get_arm(name: str) -> Arm:
    """The registered arm called ``name``; a ``RelearnError`` naming the known ones otherwise."""
    try:
        return ARMS[name]
    except KeyError:
        raise RelearnError(f"trainable {name!r} unknown; choose one of {', '.join(ARMS)}") from None


def arm_label(name: str) -> str:
    """A report's words for the arm ``name`` (the name itself for an arm not registered here)."""
    return ARMS[name].label if name in ARMS else name


def arm_description(name: str) -> str:
    """A model card's words for the arm ``name`` (the name itself for an arm not registered here)."""
    return ARMS[name].description if name in ARMS else name


def with_variant(arm: str, variant: str | None) -> str:
    """An arm's name when it runs the study's variant ``variant`` of the relearn settings (``ARM@VARIANT``); the arm
    as it is under the recipe's own settings (``variant`` None)."""
    return f"{arm}@{variant}" if variant else arm


def split_variant(arm: str) -> tuple[str, str | None]:
    """``with_variant`` undone: the arm under the recipe's own settings, and the variant's name (None without)."""
    base, _, variant = arm.partition("@")
    return base, variant or None


for _builtin in (
    Arm(DEFAULT_ARM, "only the block", "only this block trainable (everything else frozen)"),
    Arm("all", "everything trainable", "every parameter trainable", trains_everything=True),
    Arm(
        "lora-rest",
        "LoRA on the rest (block frozen)",
        "the block frozen at random and LoRA adapters on every other layer",
        trains_block=False,
        lora_rest=True,
    ),
    Arm(
        "block+lora-rest",
        "block + LoRA on the rest",
        "this block trainable plus LoRA adapters on every other layer",
        lora_rest=True,
    ),
):
    register_arm(_builtin)
